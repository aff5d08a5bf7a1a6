"""Cost: FLOP counts against the textbook formulas, symbolic batch, roofline ordering."""

from __future__ import annotations

import sympy
import torch
import torch.nn as nn

import optic
from optic import cost


def test_conv_and_linear_flops():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    p = optic.capture(m, (torch.randn(2, 3, 6, 6),))
    conv = 2 * (2 * 8 * 6 * 6) * 3 * 9
    lin = 2 * (2 * 10) * 288
    assert cost.total_flops(p) == conv + lin


def test_grouped_conv_flops_scale_with_groups():
    dense = optic.capture(nn.Conv2d(8, 8, 3), (torch.randn(1, 8, 5, 5),))
    depthwise = optic.capture(nn.Conv2d(8, 8, 3, groups=8), (torch.randn(1, 8, 5, 5),))
    assert cost.total_flops(dense) == 8 * cost.total_flops(depthwise)


def test_symbolic_batch_is_linear_in_b():
    m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    p = optic.capture(m, (torch.randn(4, 16),))
    f = cost.symbolic_batch_flops(p)
    b = cost.BATCH
    assert sympy.expand(f - b * (2 * 32 * 16 + 32 + 2 * 4 * 32)) == 0
    assert f.subs(b, 4) == cost.total_flops(p)


def test_roofline_orders_targets():
    m = nn.Sequential(nn.Conv2d(64, 64, 3), nn.ReLU())
    p = optic.capture(m, (torch.randn(8, 64, 56, 56),))
    t4, h100 = optic.targets.get("t4"), optic.targets.get("h100")
    assert 0 < cost.roofline_seconds(p, h100) < cost.roofline_seconds(p, t4)


def test_exact_pipeline_never_adds_flops_on_a_bn_cnn():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    opt = optic.optimize(m, (torch.randn(1, 3, 16, 16),), measure=False)
    assert opt.report.flops[1] < opt.report.flops[0]
