"""What an install of optic holds: its version, its type hints, and which extra each import needs.

``pip install optic`` (no extras) must give a working core: every module optic installs imports at
load time only the core dependencies; TVM is imported lazily, where lowering or tuning starts, and
the ``tvm`` extra holds exactly what those lazy imports need. (.ci/core_check.py runs the core in a
venv of its own; these tests read the source, so they catch a stray import before CI does.)
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import optic

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = [ROOT / "optic", ROOT / "passes", ROOT / "targets", ROOT / "autotune"]  # pyproject's package-dir
# distribution -> the module it installs, for the dependencies optic imports
MODULE_OF = {"torch": "torch", "networkx": "networkx", "sympy": "sympy", "numpy": "numpy", "tqdm": "tqdm",
             "apache-tvm": "tvm", "apache-tvm-ffi": "tvm_ffi"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _names(requirements: list[str]) -> set[str]:
    """Distribution names (extras, versions and markers dropped)."""
    out = set()
    for req in requirements:
        name = req.split(";")[0]
        for sep in "[=<>!~ ":
            name = name.split(sep)[0]
        out.add(name.strip().lower())
    return out


def _third_party(tree: ast.AST, *, load_time_only: bool) -> set[str]:
    """Top-level names of the non-stdlib, non-optic modules ``tree`` imports (with ``load_time_only``:
    only the imports that run when the module loads, not those inside functions or ``TYPE_CHECKING``)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if load_time_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if load_time_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m not in sys.stdlib_module_names and m not in {"optic", "__future__"}}


def _imports(load_time_only: bool) -> dict[str, set[str]]:
    """Per file that optic installs, the third-party modules it imports."""
    out = {}
    for folder in INSTALLED:
        for path in sorted(folder.rglob("*.py")):
            found = _third_party(ast.parse(path.read_text(encoding="utf-8")), load_time_only=load_time_only)
            if found:
                out[str(path.relative_to(ROOT))] = found
    return out


def test_the_import_reader_sees_lazy_and_load_time_imports():
    tree = ast.parse("import torch\nif TYPE_CHECKING:\n    import yaml\ndef f():\n    import tvm.relax\n"
                     "from tvm_ffi import x\nimport os\n")
    assert _third_party(tree, load_time_only=True) == {"torch", "tvm_ffi"}
    assert _third_party(tree, load_time_only=False) == {"torch", "yaml", "tvm", "tvm_ffi"}


def test_loading_optic_needs_only_the_core_dependencies():
    core = {MODULE_OF[d] for d in _names(_pyproject()["project"]["dependencies"])}
    stray = {f: sorted(m - core) for f, m in _imports(load_time_only=True).items() if m - core}
    assert not stray, f"imported when optic loads but not a core dependency (import them lazily): {stray}"


def test_every_lazy_import_is_in_an_extra_and_the_tvm_extra_holds_only_what_optic_imports():
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    core = {MODULE_OF[d] for d in _names(project["dependencies"])}
    lazy = set().union(*_imports(load_time_only=False).values()) - core
    offered = {MODULE_OF.get(d, d.replace("-", "_")) for extra in extras.values() for d in _names(extra)}
    assert lazy <= offered, f"imported by optic, installed by no extra: {sorted(lazy - offered)}"
    tvm = _names(extras["tvm"])
    assert tvm == {"apache-tvm", "apache-tvm-ffi"} and {MODULE_OF[d] for d in tvm} <= lazy


def test_the_extras_divide_the_jobs_and_dev_installs_them_all():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert _names(extras["rpc"]) - {"optic"} == {"tornado", "cloudpickle", "psutil"}
    assert "xgboost" in _names(extras["bench"]) and "xgboost" not in _names(extras["tvm"])
    assert any(r.replace(" ", "").startswith("optic[") and {"tvm", "rpc", "bench"} <= set(
        r.split("[")[1].split("]")[0].split(",")) for r in extras["dev"])
    assert {"pytest", "hypothesis", "ruff"} <= _names(extras["dev"])


def test_the_version_is_pyprojects():
    version = _pyproject()["project"]["version"]
    assert optic.__version__ == version
    # the fallback a checkout without installation reports
    tree = ast.parse((ROOT / "optic" / "__init__.py").read_text(encoding="utf-8"))
    literals = [n.value.value for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in n.targets)]
    assert literals == [version]


def test_the_type_hints_ship():
    assert (ROOT / "optic" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["optic"]


def test_tuning_without_tvm_says_which_extra_and_records_nothing(tmp_path, monkeypatch):
    from optic.autotune import TuningDB, tune
    from optic.autotune.operator import Operator

    tune_module = importlib.import_module("optic.autotune.tune")  # the package's `tune` is the function

    def missing():
        raise optic.LoweringError("lowering to TVM needs Apache TVM, which is not installed. Install it with "
                                  "pip install 'optic[tvm]'")

    monkeypatch.setattr(tune_module, "require_tvm", missing)
    with pytest.raises(optic.LoweringError, match=r"optic\[tvm\]"):
        tune(Operator.parse("matmul", "64x64x64"), "cpu", 2, db=tmp_path / "t.db")
    with TuningDB(tmp_path / "t.db") as db:
        assert db.summary() == []
    assert tune(Operator.parse("matmul", "64x64x64"), "cpu", 0, db=tmp_path / "t.db").config  # the model's pick


def test_every_package_folder_is_installed():
    """A folder with an ``__init__.py`` under an installed tree is in pyproject's package list: a missed
    subpackage installs nothing (a non-editable install, as the core check in CI makes, would lack it)."""
    cfg = _pyproject()["tool"]["setuptools"]
    listed = set(cfg["packages"])
    where = {pkg: ROOT / folder for pkg, folder in cfg["package-dir"].items()}
    for top, folder in where.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            name = ".".join([top, *rel.parts])
            assert name in listed, f"{init.parent.relative_to(ROOT)} is not installed: add {name!r} to packages"
