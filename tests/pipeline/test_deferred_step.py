"""A step that compiles the whole graph runs before the lossy passes that must see the graph (early exit),
and once more after them: when they all left the graph as it was, so that a declined early exit does not
cost the model its compiled graph; when they changed it, the faster of their result and the compiled graph
without their change is kept."""

from __future__ import annotations

import torch
import torch.nn as nn

from optic import targets
from optic.backend import whole
from optic.budget.calibration import Budget
from optic.ir.capture import capture
from optic.pipeline.report import Report
from optic.pipeline.runner import PassContext, run


class Step:
    name, exact, description, options = "whole_step", True, "compiles the whole graph (a stand-in)", ()
    compiles_whole_graph = True

    def __init__(self):
        self.seen: list[tuple[bool, int]] = []  # (lossy_after, nodes) per run

    def run(self, program, ctx) -> bool:
        self.seen.append((ctx.lossy_after, program.node_count()))
        return False


class Lossy:
    name, exact, description, options = "lossy_step", False, "a lossy pass that may decline", ()

    def __init__(self, changes: bool):
        self.changes = changes

    def run(self, program, ctx) -> bool:
        if self.changes:  # a change the budget allows: scale the output by 1.001
            out = next(n for n in program.gm.graph.nodes if n.op == "output")
            with program.gm.graph.inserting_before(out):
                new = program.gm.graph.call_function(torch.mul, (out.args[0], 1.001))
            out.args = (new,)
        return self.changes


class Evaluator:
    metric_name = "rel_error"

    def drop(self, program, split):
        return 0.001


def _run(changes: bool, monkeypatch, on: str = "1"):
    monkeypatch.setenv(whole.ENV, on)  # the suite switches the compiled graph off; the step offers it here
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval()
    x = torch.randn(2, 8)
    prog = capture(model, (x,), method="fx")
    ctx = PassContext(target=targets.get("cpu"), check_inputs=[((x,), {})], budget=Budget(max_drop=0.01),
                      evaluator=Evaluator(), budget_left=0.01)
    report = Report(model="m", target="cpu", capture="fx")
    step = Step()
    out = run(prog, [step, Lossy(changes)], ctx, report)
    return step, report, out, prog


def test_the_step_runs_again_when_the_lossy_passes_after_it_declined(monkeypatch):
    step, report, out, prog = _run(False, monkeypatch)
    assert step.seen == [(True, prog.node_count()), (False, prog.node_count())]
    assert [r.name for r in report.passes] == ["whole_step", "lossy_step", "whole_step"]
    assert "run again" in " ".join(report.passes[0].notes) and "run again" in " ".join(report.passes[-1].notes)


def _timed(monkeypatch, later_ms: float, compiled_ms: float):
    """compare_models answering fixed figures: the later passes' program, and the compiled graph without them."""
    from optic.pipeline import timing

    def fake(fns, budget_s, settle_s=None):
        assert set(fns) == {"later", "compiled"}
        for fn in fns.values():
            fn()  # each is a call of its program on a held-out sample
        return {"later": timing.Timing(later_ms / 1e3, later_ms / 1e3, later_ms / 1e3, 5),
                "compiled": timing.Timing(compiled_ms / 1e3, compiled_ms / 1e3, compiled_ms / 1e3, 5)}
    monkeypatch.setattr(timing, "compare_models", fake)


def test_after_a_lossy_change_the_faster_of_it_and_the_compiled_graph_is_kept(monkeypatch):
    """The lossy pass changed the graph (early exit inserted exits): the step runs again on what it first saw,
    and the two are timed; here the lossy pass's result is faster, and it is kept."""
    _timed(monkeypatch, later_ms=1.0, compiled_ms=2.0)
    step, report, out, prog = _run(True, monkeypatch)
    assert step.seen == [(True, prog.node_count()), (False, prog.node_count())]
    assert [r.name for r in report.passes] == ["whole_step", "lossy_step", "whole_step"]
    assert out.node_count() == prog.node_count() + 1
    assert report.passes[-1].rolled_back and "slower than lossy_step" in report.passes[-1].reason
    assert not report.passes[1].rolled_back


def test_a_compiled_graph_faster_than_the_lossy_change_supersedes_it(monkeypatch):
    _timed(monkeypatch, later_ms=2.0, compiled_ms=1.0)
    step, report, out, prog = _run(True, monkeypatch)
    assert out.node_count() == prog.node_count()  # the lossy pass's change is gone
    lossy = report.passes[1]
    assert lossy.rolled_back and "superseded" in lossy.reason
    assert not report.passes[-1].rolled_back and report.passes[-1].measured["against_later_ms"] == {
        "lossy_step": 2.0, "compiled": 1.0}


def test_the_step_is_not_run_again_where_the_whole_graph_is_switched_off(monkeypatch):
    step, report, _, prog = _run(False, monkeypatch, on="0")
    assert step.seen == [(True, prog.node_count())] and len(report.passes) == 2
