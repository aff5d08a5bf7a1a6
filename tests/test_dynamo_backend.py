"""``torch.compile(model, backend="optic")`` (optic/dynamo.py): found through the entry point, same outputs as
eager on the zoo and across a data-dependent ``if``, never stale weights, other sizes with ``dynamic=True``,
options forwarded, and the graphs it leaves as traced said so."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch._dynamo
import torch.nn as nn

import optic
import optic.dynamo as od
from benchmarks.dynamo_backend import Branchy  # conv+BN around `if x.sum() > 0:`, then a linear
from benchmarks.zoo import get, names
from optic.pipeline.verify import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# timing is for benchmarks: the tests check what is computed (one test keeps the CPU tactics' measuring on)
QUICK = {"measure": False}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    od.clear()
    yield
    torch._dynamo.reset()


def _same(ref, got, tol=1e-4):
    c = compare(ref, got, tol)
    assert c.ok, str(c)


def test_entry_point_needs_no_import_of_optic():
    script = textwrap.dedent("""
        import sys
        import torch
        import torch.nn as nn
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
        m[1].running_var.uniform_(0.5, 2.0)
        assert "optic" not in sys.modules
        c = torch.compile(m, backend="optic", options={"measure": False})
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            ref, got = m(x), c(x)
        import optic.dynamo
        [g] = optic.dynamo.graphs()
        assert g.report is not None and g.report.matched("bn_into_conv_or_linear") == 1, g
        print("max-diff", float((ref - got).abs().max()))
        """)
    env = {**os.environ, "OPTIC_WHOLE_GRAPH": "0", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(proc.stdout.split("max-diff")[1])
    assert diff < 1e-4


def _compiled_zoo_model(name, batch):
    """The zoo model ``name`` compiled with the backend, its output checked against eager; its entry."""
    entry = get(name)
    model, inputs = entry.factory(), entry.inputs(batch)
    compiled = torch.compile(model, backend="optic", options=QUICK)
    with torch.no_grad():
        _same(model(*inputs), compiled(*inputs))
    return entry


@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_transformer", "shared_producer", "conv1d_bn"])
def test_zoo_models_match_eager(name):
    entry = _compiled_zoo_model(name, 2)
    [g] = od.graphs()
    assert g.report is not None and g.traced is None, str(g)
    if entry.has_bn:
        assert g.report.matched("bn_into_conv_or_linear") >= 1
    if entry.family == "transformer":
        assert g.report.matched("attention_to_sdpa") >= 1, g.report.table()


def test_cpu_tactics_measure_under_the_backend():
    entry = get("tiny_cnn")
    model, inputs = entry.factory(), entry.inputs(1)
    compiled = torch.compile(model, backend="optic",
                             options={"options": {"tactics_budget_s": 1.0, "final_measure_s": 0.5}})
    with torch.no_grad():
        _same(model(*inputs), compiled(*inputs))
    [g] = od.graphs()
    tactics = g.report.pass_record("cpu_tactics")
    assert not tactics.skipped and not tactics.rolled_back
    assert g.report.measured_latency_s is not None  # the whole graph was timed against the captured one


def test_data_dependent_if_runs_both_branches_optimized():
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(optic.CaptureError):
        optic.optimize(model, (x,), measure=False)
    compiled = torch.compile(model, backend="optic", options=QUICK)
    pos, neg = x.abs() + 0.1, -x.abs() - 0.1
    with torch.no_grad():
        for inp in (pos, neg, pos, neg):
            _same(model(inp), compiled(inp))
    done = od.graphs()
    optimized = [g for g in done if g.report is not None]
    assert len(optimized) >= 3, [str(g) for g in done]  # before the break, and each branch's graph after it
    assert sum(g.report.matched("bn_into_conv_or_linear") for g in optimized) == 2


def test_weights_edited_after_compile_are_never_stale():
    torch.manual_seed(0)
    model = Branchy().eval()
    compiled = torch.compile(model, backend="optic", options=QUICK)
    x = torch.randn(2, 3, 16, 16).abs()
    with torch.no_grad():
        _same(model(x), compiled(x))
        before = compiled(x)
        model.conv1.weight.mul_(2)  # in place: same tensor, new version
        after = compiled(x)
        _same(model(x), after)
        assert not torch.allclose(before, after)
        other = Branchy().eval()  # load_state_dict copies into the same tensors
        model.load_state_dict(other.state_dict())
        _same(other(x), compiled(x))
    again = [g for g in od.graphs() if "#" in g.graph]
    assert again, [str(g) for g in od.graphs()]  # optimized again with the new weights


def test_weights_changing_on_every_call_end_with_the_traced_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    compiled = torch.compile(model, backend="optic", options=QUICK)
    x = torch.randn(3, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(od.MAX_OPTIMIZATIONS + 2):
            model[0].weight.add_(0.5)
            _same(model(x), compiled(x))
    record = od.graphs()[0]
    assert record.traced is not None and "changed" in record.traced
    assert any("weights changed" in str(w.message) for w in caught)


def test_dynamic_shapes_serve_other_batches():
    entry = get("tiny_cnn")
    model = entry.factory()
    compiled = torch.compile(model, backend="optic", dynamic=True, options=QUICK)
    with torch.no_grad():
        for batch in (2, 5, 3):
            (x,) = entry.inputs(batch)
            _same(model(x), compiled(x))
    optimized = [g for g in od.graphs() if g.report is not None]
    assert len(optimized) == 1, [str(g) for g in od.graphs()]  # one graph, one optimization, every batch
    assert optimized[0].report.matched("bn_into_conv_or_linear") >= 1  # eps, lifted by dynamo, was frozen


def test_options_are_forwarded_and_unknown_ones_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = torch.compile(model, backend="optic", options={"passes": ["cleanup"], "measure": False})
    with torch.no_grad():
        _same(model(x), compiled(x))
    [g] = od.graphs()
    assert [p.name for p in g.report.passes] == ["cleanup"]
    torch._dynamo.reset()
    bad = torch.compile(model, backend="optic", options={"passes": ["cleanup"], "tolerence": 1e-3})
    with pytest.raises(Exception, match="unknown option.*'tolerence'.*'tolerance'"):
        with torch.no_grad():
            bad(x)
    torch._dynamo.reset()
    moded = torch.compile(model, backend="optic", mode="max-autotune")
    with pytest.raises(Exception, match="no modes"), torch.no_grad():
        moded(x)


def test_a_bad_option_value_is_the_users_error():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    compiled = torch.compile(model, backend="optic", options={"target": "cpuu"})
    with pytest.raises(optic.UnknownTargetError, match="cpu"), torch.no_grad():
        compiled(torch.randn(2, 4))


def test_grad_mode_runs_the_traced_graph_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    compiled = torch.compile(model, backend="optic", options=QUICK)
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="grad"):
        out = compiled(x)
    assert out.requires_grad  # gradients still flow, as in eager
    out.sum().backward()
    assert model[0].weight.grad is not None
    assert "grad" in od.graphs()[0].traced


def test_a_graph_that_writes_state_runs_traced():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="optic", options=QUICK)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), pytest.warns(UserWarning, match="writes into"):
        _same(twin(x), compiled(x))
    # the running statistics were updated once, as eager's were (the check ran on copies)
    assert torch.equal(model[1].running_mean, twin[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1


def test_graphs_without_heavy_ops_are_left_alone_quietly():
    compiled = torch.compile(lambda x: torch.relu(x * 2 + 1), backend="optic")
    x = torch.randn(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(torch.relu(x * 2 + 1), compiled(x))
    [g] = od.graphs()
    assert g.report is None and "no conv" in g.traced


def _hf_available() -> bool:
    try:
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


ZOO = [n for n in names() if get(n).source != "hf" or _hf_available()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model(name):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _compiled_zoo_model(name, 1)
    assert any(g.report is not None for g in od.graphs()), [str(g) for g in od.graphs()]
