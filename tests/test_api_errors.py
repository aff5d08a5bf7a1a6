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
