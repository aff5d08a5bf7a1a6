"""optimize()'s own arguments: a bad value is one clear sentence naming the argument, before any work."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import optic


@pytest.mark.parametrize("bad", [-1, -1e-6, math.nan, math.inf, "abc", True, [1e-4]])
def test_a_tolerance_that_is_not_a_finite_non_negative_number_is_refused(bad):
    with pytest.raises(optic.OpticError, match="tolerance"):
        optic.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), tolerance=bad, measure=False)


def test_a_valid_tolerance_is_used_as_given():
    o = optic.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), tolerance=1e-3, measure=False)
    assert o.report.tolerance == 1e-3


@pytest.mark.parametrize("kwargs, message", [
    ({"disable": ["fold_nrom"]}, r"cannot disable unknown pass\(es\) \['fold_nrom'\]"),
    ({"backend": "onnx"}, "unknown backend 'onnx'"),
    ({"passes": ["fold_nrom"]}, "fold_norm"),
])
def test_bad_arguments_are_refused_before_the_model_is_captured(kwargs, message, monkeypatch):
    monkeypatch.setattr("optic.api.capture_program", lambda *a, **k: pytest.fail("captured despite a bad argument"))
    with pytest.raises(optic.OpticError, match=message):
        optic.optimize(nn.Linear(4, 4), (torch.randn(2, 4),), measure=False, **kwargs)
