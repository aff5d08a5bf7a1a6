"""Shared test set-up: hypothesis profiles and small helpers."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI: a fixed number of examples, derandomized (the same examples every run), no deadline (the
# machine is shared and slow). "deep": many more examples, random, for a local bug hunt:
#   HYPOTHESIS_PROFILE=deep pytest tests/test_properties.py
settings.register_profile("ci", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def max_rel_err(a, b) -> float:
    """Worst |a − b| relative to max|a| over the tensors of two outputs."""
    from optic.verify import compare

    return compare(a, b, float("inf")).rel
