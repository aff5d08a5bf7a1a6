"""The pipeline: verification, roll-back with a reason, disabling passes by name, the report."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

import optic
from optic import ir, targets
from optic.ir.opview import view
from optic.pipeline import PassContext, final, registry
from optic.pipeline.report import Report
from optic.pipeline.verify import run_seeded


class BreakWeights:
    """A deliberately wrong 'exact' pass: doubles the first linear's weight."""

    name = "break_weights"
    exact = True
    description = "test-only"

    def run(self, program, ctx):
        gm = program.gm
        for n in gm.graph.nodes:
            op = view(n, gm)
            if op is not None and op.kind == "linear":
                with gm.graph.inserting_before(n):
                    w = ir.const_node(gm.graph, gm, op.const("weight") * 2, "w")
                    b = ir.const_node(gm.graph, gm, op.const("bias"), "b")
                    new = gm.graph.call_function(torch.ops.aten.linear.default, (op.x, w, b))
                ir.replace(n, new, self.name)
                gm.graph.erase_node(n)
                return True
        return False


class Crash:
    name = "crash"
    exact = True
    description = "test-only"

    def run(self, program, ctx):
        out = next(n for n in program.gm.graph.nodes if n.op == "output")
        out.args = (next(iter(program.gm.graph.nodes)),)  # half-done surgery: output is now the input...
        raise RuntimeError("boom")


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_a_pass_that_breaks_numerics_is_rolled_back_and_reported():
    m, x = _model(), torch.randn(3, 4)
    opt = optic.optimize(m, (x,), passes=[BreakWeights(), "cleanup"], measure=False)
    rec = opt.report.pass_record("break_weights")
    assert rec.rolled_back and "numerical check failed" in rec.reason
    torch.testing.assert_close(opt(x), m(x))
    assert "ROLLED BACK" in str(opt.report)


def test_a_pass_that_crashes_is_rolled_back_never_half_applied():
    m, x = _model(), torch.randn(3, 4)
    opt = optic.optimize(m, (x,), passes=[Crash(), "fuse"], measure=False)
    rec = opt.report.pass_record("crash")
    assert rec.rolled_back and "RuntimeError: boom" in rec.reason
    torch.testing.assert_close(opt(x), m(x))


def test_passes_can_be_disabled_by_argument_and_environment(monkeypatch):
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
    x = torch.randn(1, 3, 4, 4)
    opt = optic.optimize(m, (x,), disable=["fold_norm"], measure=False)
    assert opt.report.pass_record("fold_norm").skipped
    monkeypatch.setenv("OPTIC_DISABLE", "fold_norm,fuse")
    opt = optic.optimize(m, (x,), measure=False)
    assert opt.report.pass_record("fold_norm").skipped and opt.report.pass_record("fuse").skipped
    assert opt.report.matched("bn_into_conv_or_linear") == 0


def test_unknown_pass_names_are_clear_errors():
    with pytest.raises(optic.UnknownPassError, match="fold_norm"):
        optic.optimize(_model(), (torch.randn(1, 4),), passes=["fold_norms"])
    with pytest.raises(optic.OpticError, match="cannot disable"):
        optic.optimize(_model(), (torch.randn(1, 4),), disable=["nope"])


def test_report_records_counts_and_serializes():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2)).eval()
    opt = optic.optimize(m, (torch.randn(1, 3, 8, 8),), measure=False)
    rep = opt.report
    fold = rep.pass_record("fold_norm")
    assert fold.changed and fold.nodes_after < fold.nodes_before
    assert fold.params_after < fold.params_before
    assert fold.max_error <= rep.tolerance
    d = json.loads(rep.to_json())
    assert [p["name"] for p in d["passes"]] == [p.name for p in rep.passes]
    assert d["passes"][1]["matched"] == {"bn_into_conv_or_linear": 1}
    assert "fold_norm" in str(rep) and "bn_into_conv_or_linear: 1" in str(rep)


def test_user_model_is_never_mutated():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    optic.optimize(m, (torch.randn(2, 3, 8, 8),), measure=False)
    assert m.training and all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert isinstance(m[1], nn.BatchNorm2d)


def test_presets_are_data():
    assert registry.PRESETS["exact"][0] == "cleanup"
    assert {p.name for p in registry.resolve("exact")} <= set(registry.names())
    assert all(registry.get(n).exact for n in registry.PRESETS["exact"])


def test_tolerance_is_configurable_and_enforced():
    m, x = _model(), torch.randn(3, 4)
    opt = optic.optimize(m, (x,), passes=[BreakWeights()], tolerance=10.0, measure=False)
    assert not opt.report.pass_record("break_weights").rolled_back  # within a (silly) declared tolerance


def test_backend_steps_join_any_pass_list_where_the_table_says():
    def names(passes, backend="tvm", kind="cpu"):
        return [p.name for p in registry.with_backend(registry.resolve(passes), backend, kind)]

    assert names("exact") == ["cleanup", "fold_norm", "fuse", "cleanup", "tvm_kernels", "cpu_tactics"]
    assert names("default")[-5:] == ["quantize", "precision", "tvm_kernels", "cpu_tactics", "early_exit"]
    # before cpu_tactics wherever early_exit is: the table's order of preference, not the list's
    assert names(["early_exit", "cpu_tactics"]) == ["early_exit", "tvm_kernels", "cpu_tactics"]
    assert names(["fold_norm", "early_exit", "cleanup"]) == ["fold_norm", "tvm_kernels", "early_exit", "cleanup"]
    assert names(["fold_norm"]) == ["fold_norm", "tvm_kernels"]
    assert names(["tvm_kernels", "fold_norm"]) == ["tvm_kernels", "fold_norm"]  # never twice
    # a GPU's generated kernels go into an artifact; how the whole graph runs there is measured last
    assert names("exact", kind="gpu") == [*registry.PRESETS["exact"], "gpu_tactics"]
    assert names("exact", backend="torch") == registry.PRESETS["exact"]
    assert names("default", backend="torch", kind="gpu")[-3:] == ["cpu_tactics", "gpu_tactics", "early_exit"]
    with pytest.raises(optic.OpticError, match="unknown backend 'onnx'.*'torch'.*'tvm'"):
        optic.optimize(_model(), (torch.randn(1, 4),), backend="onnx")


def _final_setup():
    m, x = _model(), torch.randn(3, 4)
    original = optic.capture(m, (x,))
    checks = [((x,), {})]
    reference = [run_seeded(original.gm, *c) for c in checks]
    ctx = PassContext(target=targets.get("cpu"), measure=False, check_inputs=checks)
    ctx.reference = reference  # as pipeline.run leaves it when no lossy pass ran
    return m, original, ctx, Report(model="Sequential", target="cpu", capture="fx"), checks, reference


def test_the_final_check_returns_the_captured_graph_when_the_whole_disagrees():
    m, original, ctx, report, checks, reference = _final_setup()
    with torch.no_grad():
        m[0].weight.mul_(2)  # a result that passed each step's check but not the whole (a bug to report)
    wrong = optic.capture(m, checks[0][0])
    got = final.check_result(original, wrong, ctx, report, checks=checks, reference=reference, tolerance=1e-4)
    assert got is original and report.final_error == 0.0
    assert any("disagrees with the original" in n and "returned the captured graph" in n for n in report.notes)
    report.notes.clear()
    same = original.clone()
    assert final.check_result(original, same, ctx, report, checks=checks, reference=reference, tolerance=1e-4) is same
    assert report.notes == []
    # verify=False measures the error but keeps the result
    assert final.check_result(original, wrong, ctx, report, checks=checks, reference=reference, tolerance=1e-4,
                              verify=False) is wrong
    assert report.final_error > 1e-4


def test_never_slower_keeps_the_captured_graph_when_the_result_measures_slower():
    _, original, _, report, checks, _ = _final_setup()
    slow = original.clone()
    slow.runner = lambda x: (time.sleep(0.003), slow.gm(x))[1]
    assert final.never_slower(original, slow, report, 0.3, checks) is original
    assert any("measured slower here" in n for n in report.notes)
    before, after = report.measured_latency_s
    assert before == after  # the report gives the latency of what is returned
