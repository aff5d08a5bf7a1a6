"""Bad calibration data gets one clear error naming the batch and what is wrong with it, before any
pass runs, never a traceback from deep inside torch; non-finite weights and outputs are detected."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import optic
from optic.budget.calibration import Budget, CalibrationError, Evaluator, split
from optic.errors import OpticError
from optic.pipeline.health import nonfinite_outputs, nonfinite_tensors

K = 5  # classes
EXAMPLE = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, K)).eval()


def images(n: int = 3, b: int = 6, channels: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, channels, 8, 8, generator=g) for _ in range(n)]


def labels(b: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (b,), generator=torch.Generator().manual_seed(seed))


def optimize(calibration, passes: str = "default", capture: str = "auto", **budget):
    return optic.optimize(cnn(), (EXAMPLE,), passes=passes, capture=capture, measure=False,
                          budget=Budget(max_drop=0.01, **budget), calibration=calibration)


def raised(calibration, **options) -> str:
    with pytest.raises(OpticError) as e:
        optimize(calibration, **options)
    assert isinstance(e.value, CalibrationError)
    assert "Traceback" not in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


# -- labels -------------------------------------------------------------------------------------------
def test_labels_with_one_entry_per_logit_are_named_with_the_shape_top1_needs():
    msg = raised([(x, torch.randint(0, K, (6, K))) for x in images()])
    assert msg.startswith("calibration batch 0: ")
    assert "[6, 5]" in msg and "one class index per sample" in msg and "[6]" in msg


def test_float_labels_are_labels_and_top1_asks_for_class_indices():
    msg = raised([(x, labels().float()) for x in images()])
    assert msg.startswith("calibration batch 0: ") and "float32" in msg and "integer class indices" in msg
    # the accepted forms are named
    assert "optic.Labeled" in msg and "metric" in msg


def test_float_targets_reach_a_callable_metric():
    seen = []

    def negative_mse(out, target):
        seen.append(target.dtype)
        return -float((out[:, 0] - target).pow(2).mean())

    data = [(x, torch.randn(6)) for x in images()]
    optimize(data, passes="exact", metric=negative_mse)  # the budget is set up; no lossy pass needed
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("bad, shown", [(7, "7"), (-1, "-1"), (K, "5")])
def test_labels_outside_the_class_range_are_an_error(bad, shown):
    data = [(x, labels(seed=i)) for i, x in enumerate(images())]
    data[1][1][3] = bad
    msg = raised(data)
    assert msg.startswith("calibration batch 1: ")
    assert f"label {shown}" in msg and f"{K} classes" in msg and "0 to 4" in msg


def test_labels_unused_by_the_metric_get_a_note():
    m = cnn()
    cal = split([(x, labels()) for x in images()], Budget(metric="rel_error"), single_input=True, batch_size=None)
    Evaluator(Budget(metric="rel_error"), cal, m)
    assert any("labels are not used" in n for n in cal.notes)


# -- inputs -------------------------------------------------------------------------------------------
def test_batches_the_model_cannot_take_name_the_batch_its_shape_and_the_examples():
    msg = raised(images(channels=1))
    assert msg.startswith("calibration batch 0: ")
    assert "[6, 1, 8, 8]" in msg and "example inputs are [4, 3, 8, 8]" in msg
    assert "3 channels" in msg  # what torch said, in one line


def test_one_batch_unlike_the_others_is_named():
    data = images()
    data[2] = torch.randn(6, 1, 8, 8)
    msg = raised(data)
    assert msg.startswith("calibration batch 2: ")
    assert "[6, 1, 8, 8]" in msg and "[6, 3, 8, 8]" in msg and "batch size" in msg


def test_labels_unlike_the_first_batch_are_named():
    data = [(x, labels()) for x in images()]
    data[1] = (data[1][0], labels()[:, None])
    msg = raised(data)
    assert msg.startswith("calibration batch 1: ") and "[6, 1]" in msg and "[6]" in msg


def test_a_fixed_batch_graph_is_checked_at_its_own_batch():
    # torch.export specializes the graph to the example's batch of 4: batches of 6 are checked at 4
    optimize([(x, labels()) for x in images()], passes="exact", capture="export")
    msg = raised(images(channels=1), passes="exact", capture="export")
    assert msg.startswith("calibration batch 0: ") and "example inputs are [4, 3, 8, 8]" in msg


# -- non-finite weights and outputs -------------------------------------------------------------------
def test_nonfinite_tensors_names_parameters_and_buffers():
    m = cnn()
    assert nonfinite_tensors(m) == []
    with torch.no_grad():
        m[1].running_var[2] = float("nan")
        m[5].weight[0, :2] = float("inf")
    found = nonfinite_tensors(m)
    assert found == ["1.running_var (1 NaN of 4 values)", "5.weight (2 Inf of 20 values)"]


def test_nonfinite_outputs_counts_per_output():
    assert nonfinite_outputs(torch.ones(3)) == []
    out = (torch.tensor([1.0, float("nan"), float("-inf")]), torch.arange(3), torch.full((2,), float("nan")))
    assert nonfinite_outputs(out) == ["output 0: 1 NaN and 1 Inf of 3 values", "output 2: 2 NaN of 2 values"]


def test_nan_in_batch_norm_statistics_is_a_report_note_and_final_error_reads_nan():
    m = cnn()
    with torch.no_grad():
        m[1].running_var.fill_(float("nan"))
    fast = optic.optimize(m, (EXAMPLE,), measure=False)
    assert any("1.running_var (4 NaN of 4 values)" in n for n in fast.report.notes)
    assert any("outputs on the example inputs are not finite (output 0: 20 NaN of 20 values)" in n
               for n in fast.report.notes)
    assert math.isnan(fast.report.final_error)
    fine = optic.optimize(cnn(), (EXAMPLE,), measure=False)  # a healthy model gets neither
    assert not any("not finite" in n for n in fine.report.notes) and fine.report.final_error <= 1e-4


def test_nan_weights_under_a_budget_are_noted():
    m = cnn()
    with torch.no_grad():
        m[5].weight[0, 0] = float("inf")
    fast = optic.optimize(m, (EXAMPLE,), passes="default", measure=False, budget=optic.Budget(max_drop=0.01),
                          calibration=[(x, labels()) for x in images()])
    assert any("5.weight (1 Inf of 20 values)" in n for n in fast.report.notes)
