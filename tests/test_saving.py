"""optic.save / optic.load: every result round-trips with its outputs, its report and its fast implementation."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

import optic
from benchmarks.zoo import get, names, output_tensors
from optic.backend import whole
from optic.backend.vendor import PackedConvWeight
from optic.errors import OpticError

EXAMPLES = Path(__file__).parent.parent / "examples"


def serving(module: torch.nn.Module) -> dict[str, bool]:
    """Per machine-specific implementation in ``module``: whether it ran its fast form on the last call (the
    compiled or packaged whole graph, the packed oneDNN weights), not a fallback."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, whole.PackagedGraph):
            out[name] = (m._runner is not None or m._runner_exact is not None) and m.failed is None
        elif isinstance(m, whole.CompiledGraph):
            out[name] = m._compiled is not None and m.failed is None
        elif isinstance(m, PackedConvWeight):
            out[name] = m._packed is not None
    return out


def round_trip(result, inputs: tuple, tmp_path: Path):
    path = optic.save(result, tmp_path / "model.optic.pt")
    loaded = optic.load(path)
    with torch.no_grad():
        want, got = result(*inputs), loaded(*inputs)
    for a, b in zip(output_tensors(want), output_tensors(got), strict=True):
        assert torch.equal(a, b) or float((a - b).abs().max()) <= 1e-6 * float(a.abs().max()), "outputs differ"
    assert serving(loaded) == serving(result), "the loaded module runs another implementation"
    assert [p.name for p in loaded.report.passes] == [p.name for p in result.report.passes]
    assert loaded.report.final_error == result.report.final_error
    assert loaded.report.notes[-1].startswith("loaded from model.optic.pt")
    return loaded


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_transformer"])
def test_a_default_result_round_trips(name, tmp_path):
    entry = get(name)
    result = optic.optimize(entry.factory(), entry.inputs(1))
    loaded = round_trip(result, entry.inputs(1), tmp_path)
    # the result serves other batches after loading too
    with torch.no_grad():
        a, b = result(*entry.inputs(3)), loaded(*entry.inputs(3))
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.slow  # two AOTInductor builds: about a minute
def test_a_packaged_whole_graph_built_elsewhere_is_built_again(tmp_path, monkeypatch):
    entry = get("tiny_cnn")
    program = optic.capture(entry.factory(), entry.inputs(1))
    result = optic.OptimizedModule(whole.wrap(program, packaged=True), optic.Report("TinyCNN", "cpu", "fx"))
    (built,) = [m for m in result.modules() if isinstance(m, whole.PackagedGraph)]
    path = optic.save(result, tmp_path / "m.pt")
    monkeypatch.setattr("optic.targets.cpu.host_fingerprint", lambda: "another|cpu|avx2|torch x")
    loaded = optic.load(path)
    assert "on another machine" in loaded.report.notes[-1]
    with torch.no_grad():
        for b in (1, 3):  # the batch is dynamic in the package built again too
            assert torch.allclose(loaded(*entry.inputs(b)), result(*entry.inputs(b)), atol=1e-5)
    (pkg,) = [m for m in loaded.modules() if isinstance(m, whole.PackagedGraph)]
    assert pkg.machine == "another|cpu|avx2|torch x" and pkg.package != built.package  # built here
    assert serving(loaded) == {"graph_module.compiled": True}


def test_torch_save_works_too():
    entry = get("shared_producer")
    result = optic.optimize(entry.factory(), entry.inputs(1))
    again = pickle.loads(pickle.dumps(result))
    with torch.no_grad():
        assert torch.allclose(again(*entry.inputs(2)), result(*entry.inputs(2)), atol=1e-6)


def test_bad_files_and_arguments_are_clear_errors(tmp_path):
    with pytest.raises(OpticError, match="what optic.optimize returns"):
        optic.save(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(OpticError, match="does not exist"):
        optic.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(OpticError, match="not a file optic.save wrote"):
        optic.load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(OpticError, match="not a file optic.save wrote"):
        optic.load(tmp_path / "junk.pt")


# every zoo model round-trips in test_zoo_optimize (exact passes, tactics not measured); here the CPU step's
# measured implementations (packages, compiled graphs, oneDNN weights) on a CNN, a mobile CNN and HF models
TACTICS = [n for n in ("resnet18", "mobilenetv2", "hf_bert", "hf_gpt2", "hf_resnet") if n in names()]


@pytest.mark.slow
@pytest.mark.parametrize("name", TACTICS)
def test_measured_tactics_round_trip(name, tmp_path):
    entry = get(name)
    result = optic.optimize(entry.factory(), entry.inputs(1))
    round_trip(result, entry.inputs(1), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("example", ["digits_cnn", "digits_transformer"])
def test_budgeted_digits_models_round_trip(example, tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    module = __import__(example)
    common = __import__("digits_common")
    model = module.build()
    result = optic.optimize(model, common.example_inputs(), passes="default", budget=optic.Budget(max_drop=0.01),
                            calibration=common.calibration())
    assert result.report.budget, "the lossy passes ran"
    loaded = round_trip(result, common.example_inputs(), tmp_path)
    x = common.load_digits().test.x[:64]
    with torch.no_grad():
        assert torch.equal(result(x).argmax(1), loaded(x).argmax(1))


@pytest.mark.parametrize("cls_path", ["optic.pipeline.report:Report", "optic.ir.program:Program",
                                      "optic.ir.contract:CallSignature"])
def test_a_file_saved_before_the_core_moved_still_loads(cls_path, tmp_path, monkeypatch):
    """Files saved before the core moved into subpackages name their classes by the old module paths
    (optic.report, optic.program, ...): they load, through the table of moved modules."""
    import importlib

    from optic import saving

    module_name, _, cls_name = cls_path.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    old = next(o for o, n in saving.MOVED.items() if n == module_name)
    entry = get("tiny_cnn")
    result = optic.optimize(entry.factory(), entry.inputs(1), measure=False)
    stand_in = types.ModuleType(old)  # the old module, as an old optic had it, while saving
    setattr(stand_in, cls_name, cls)
    monkeypatch.setattr(cls, "__module__", old)
    monkeypatch.setitem(sys.modules, old, stand_in)
    path = optic.save(result, tmp_path / "old.optic.pt")
    monkeypatch.undo()
    assert old not in sys.modules or old in saving.MOVED.values()
    loaded = optic.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(*entry.inputs(1)), result(*entry.inputs(1)))
    monkeypatch.setattr(saving, "MOVED", {})
    with pytest.raises(OpticError, match="not a file optic.save wrote"):
        optic.load(path)  # without the table the old path is not found: the table is what loads it
