"""Shared test set-up: the hypothesis profile (see hypothesis_profiles.py) and small helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis_profiles import load_profile

load_profile()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def max_rel_err(a, b) -> float:
    """Worst |a − b| relative to max|a| over the tensors of two outputs."""
    from optic.verify import compare

    return compare(a, b, float("inf")).rel
