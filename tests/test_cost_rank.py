"""benchmarks.cost_rank: which configurations it samples, and how it sums up a template."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from benchmarks import cost_rank  # noqa: E402
from optic.autotune.operator import Operator  # noqa: E402


def test_the_spread_takes_the_best_the_worst_and_evenly_spaced_ranks_between():
    predicted = np.array([5.0, 1.0, 3.0, 9.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5])
    order = np.argsort(predicted, kind="stable")
    rows = cost_rank.spread(predicted, order, 4)
    assert rows[0] == int(order[0]) and rows[-1] == int(order[-1])  # the model's best and worst
    ranks = [int(np.flatnonzero(order == r)[0]) for r in rows]
    assert ranks == sorted(ranks) and len(set(ranks)) == 4 and np.ptp(np.diff(ranks)) <= 1
    assert cost_rank.spread(predicted, order, 50) == [int(i) for i in order]  # more asked than there are


def test_templates_are_named_with_the_layout_they_were_asked_about_and_summed_up_by_median():
    conv = Operator.parse("conv2d", "1x16x8x8,16x16x3x3,pad=1", layout="NCHWc")
    assert cost_rank.template_of(conv) == "conv2d_direct_cpu NCHWc"
    assert cost_rank.template_of(Operator("matmul", (4, 8, 16), b_layout="nk")) == "matmul_cpu B[N,K]"
    rows = [{"template": "a", "rank_correlation": v} for v in (0.9, 0.2, 0.7)]
    rows += [{"template": "b", "rank_correlation": None}]  # too few measurements: not counted
    (a,) = cost_rank.summary(rows)
    assert a == {"template": "a", "kernels": 3, "median": 0.7, "lowest": 0.2, "at_least_half": 2}
