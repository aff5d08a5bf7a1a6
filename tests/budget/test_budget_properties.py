"""Property tests of the budget: over generated models, budgets and metrics, the lossy pipeline's
held-out drop (measured again here, independently) never exceeds the budget, the model still runs
with the original's output structure, and a budget of 0 leaves the outputs exact."""

from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import examples
from strategies import any_model, cnn_models, mlp_models

import optic
from optic.budget.calibration import Budget, Evaluator, split
from optic.pipeline.verify import compare, generated_inputs


def _calibration(inputs: tuple, n: int = 10) -> list[tuple]:
    return [args for args, _ in generated_inputs(inputs, {}, n, seed=7)]


def _optimize(model, inputs, budget, capture="auto"):
    data = _calibration(inputs)
    fast = optic.optimize(model, inputs, target="cpu", passes="default", budget=budget, calibration=data,
                          capture=capture, measure=False)
    return fast, data


@examples(12)
@given(any_model(), st.sampled_from([0.02, 0.1, 0.3]), st.sampled_from(["rel_error", "agreement"]),
       st.sampled_from(["auto", "export"]))
def test_held_out_drop_never_exceeds_the_budget(model_inputs, max_drop, metric, capture):
    model, inputs = model_inputs
    before = copy.deepcopy(model.state_dict())
    budget = Budget(max_drop=max_drop, metric=metric)
    fast, data = _optimize(model, inputs, budget, capture)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the user's model is untouched
    cal = split(data, budget, single_input=True,
                batch_size=inputs[0].shape[0] if fast.program.capture == "export" else None)
    drop = Evaluator(budget, cal, model).drop(fast, "holdout")
    assert drop <= max_drop + 1e-9, fast.report.table()
    with torch.no_grad():
        out, ref = fast(*inputs), model(*inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()


@examples(8)
@given(st.one_of(cnn_models(), mlp_models()))
def test_a_zero_budget_leaves_outputs_exact(model_inputs):
    model, inputs = model_inputs
    fast, _ = _optimize(model, inputs, Budget(max_drop=0.0, metric="rel_error"))
    assert all(p.exact or p.skipped for p in fast.report.passes)
    with torch.no_grad():
        assert compare(model(*inputs), fast(*inputs), 1e-4).ok


def test_a_generous_budget_is_spent_and_stays_within_bounds():
    """The properties above are not vacuous: with room to spend, the lossy passes do change the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64)).eval()
    with torch.no_grad():  # a middle layer of rank 8 plus a little noise: factoring it costs almost nothing
        model[2].weight.copy_(torch.randn(512, 8) @ torch.randn(8, 512) / 64 + torch.randn(512, 512) * 1e-3)
    inputs = (torch.randn(8, 64),)
    budget = Budget(max_drop=0.5, metric="rel_error")
    fast, data = _optimize(model, inputs, budget)
    kept = [r for r in fast.report.budget["actions"] if r["status"] == "kept"]
    assert kept and fast.report.params[1] < fast.report.params[0]
    cal = split(data, budget, single_input=True, batch_size=None)
    assert 0 < Evaluator(budget, cal, model).drop(fast, "holdout") <= 0.5
