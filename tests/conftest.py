"""Shared test set-up: the hypothesis profile (see hypothesis_profiles.py) and small helpers."""

from __future__ import annotations

import os

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
    from optic.pipeline.verify import compare

    return compare(a, b, float("inf")).rel


# The CPU step also offers the whole graph compiled by Inductor (optic.backend.whole): seconds of
# compiling per optimize. The suite runs without it, except tests/backend/test_whole_graph.py, which switches
# it on; set OPTIC_WHOLE_GRAPH=1 to run everything with it.
os.environ.setdefault("OPTIC_WHOLE_GRAPH", "0")
