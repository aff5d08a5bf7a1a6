"""The house's layers, read from the import statements of every installed module.

- a pass (``passes/``) never imports another pass: what two passes share lives in the core;
- the core (``optic/``, the backend included) never imports a pass: passes register themselves;
- ``targets/`` (hardware descriptions) and ``autotune/`` (search, cost model, measurement) are not a
  cycle: autotune reads targets, targets import nothing of autotune, and autotune reaches the code
  generator it measures by name (its builder string), never by import;
- nothing installed imports ``benchmarks/``, a folder of the checkout (``optic bench`` runs it as a command);
- the dumps only record and render: ``optic.dump`` runs no pipeline, lowering, tuning or code generator.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# installed package name -> source folder (pyproject's package-dir)
PACKAGES = {"optic": ROOT / "optic", "optic.passes": ROOT / "passes", "optic.targets": ROOT / "targets",
            "optic.autotune": ROOT / "autotune"}


def _module_name(path: Path) -> str:
    for pkg, folder in sorted(PACKAGES.items(), key=lambda kv: -len(str(kv[1]))):
        if path.is_relative_to(folder):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([pkg, *parts])
    raise AssertionError(path)


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (at any depth of the file: lazy ones count)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path).split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from optic import passes` imports a module too
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _pass_modules() -> set[str]:
    return {_module_name(p) for p in _files(PACKAGES["optic.passes"]) if p.name != "__init__.py"}


def _pass_of(module: str) -> str:
    """The pass a module belongs to: a module of ``passes/``, or a package there with all its modules
    (``optic.passes.prune.channels`` -> ``optic.passes.prune``)."""
    return ".".join(module.split(".")[:3])


def _hits(names: set[str], prefixes: set[str]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


def test_the_module_names_are_read_right():
    """The checks below are only as good as the import reading: a relative import is resolved."""
    assert "optic.backend.vendor" in imports(ROOT / "optic" / "backend" / "generated.py")
    assert "optic.autotune.operator" in imports(ROOT / "autotune" / "tune.py")
    assert _pass_of("optic.passes.prune.channels") == "optic.passes.prune" == _pass_of("optic.passes.prune")
    assert _pass_of("optic.passes.fold_norm") == "optic.passes.fold_norm"


@pytest.mark.parametrize("path", [p for p in _files(PACKAGES["optic.passes"]) if p.name != "__init__.py"],
                         ids=lambda p: p.name)
def test_no_pass_imports_another_pass(path):  # (the package's __init__ lists them all: that is registration)
    own = _pass_of(_module_name(path))
    others = {_pass_of(m) for m in _pass_modules()} - {own}
    assert not _hits(imports(path), others), f"{path.name} imports another pass: share it through the core instead"


@pytest.mark.parametrize("path", _files(PACKAGES["optic"]), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_imports_no_pass(path):
    assert not _hits(imports(path), {"optic.passes"} | _pass_modules()), \
        f"{path.relative_to(ROOT)} imports a pass: passes register themselves (optic.pipeline.registry)"


def test_targets_and_autotune_are_not_a_cycle():
    targets_import = set().union(*(imports(p) for p in _files(PACKAGES["optic.targets"])))
    autotune_import = set().union(*(imports(p) for p in _files(PACKAGES["optic.autotune"])))
    assert not _hits(targets_import, {"optic.autotune"}), "targets/ describes hardware and imports nothing of autotune"
    assert not _hits(autotune_import, {"optic.backend"}), \
        "autotune/ names the code generator it measures (a builder string) and never imports the backend"


def _installed_files() -> list[Path]:
    return [p for folder in PACKAGES.values() for p in _files(folder)]


@pytest.mark.parametrize("path", _installed_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_installed_imports_the_benchmarks(path):
    assert not _hits(imports(path), {"benchmarks"}), \
        f"{path.relative_to(ROOT)} imports benchmarks/, which is not installed: optic bench runs it as a command"


def test_the_benchmark_check_sees_an_import_of_it(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from benchmarks import runner\n")
    assert _hits(imports(probe), {"benchmarks"}) == {"benchmarks", "benchmarks.runner"}


def test_the_dumps_only_record_and_render():
    drivers = {"optic.api", "optic.backend", "optic.autotune", "optic.pipeline.runner", "optic.pipeline.final"}
    assert not _hits(imports(ROOT / "optic" / "dump.py"), drivers), \
        "optic/dump.py runs something: the CLI (or optic.backend.inspect) drives, the dump renders"
