"""cpu_tactics: the layout rewrite is exact, choices are measured and recorded, other targets decline."""

from __future__ import annotations

import torch
import torch.nn as nn

import optic
from optic.passes.cpu_tactics import to_channels_last


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()


def test_channels_last_rewrite_is_exact_and_keeps_outputs_contiguous():
    m = _cnn()
    x = torch.randn(2, 3, 12, 12)
    p = optic.capture(m, (x,))
    assert to_channels_last(p.gm) == 3
    out = p.gm(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-4)


def test_tactics_measure_and_record_what_they_chose():
    m, x = _cnn(), torch.randn(1, 3, 32, 32)
    opt = optic.optimize(m, (x,), options={"tactics_budget_s": 2, "tactics_confirm_s": 2})
    rec = opt.report.pass_record("cpu_tactics")
    variants = rec.measured["variants_ms"]
    assert "torch ops" in variants and "channels-last" in variants
    before, after = rec.measured["latency_s"]
    assert after <= before
    if rec.changed:  # kept only when it measured faster, and the report names the variant kept
        assert after < before
        assert any(k in rec.matched for k in variants)
    torch.testing.assert_close(opt(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())


def test_tactics_decline_off_host():
    m, x = _cnn(), torch.randn(1, 3, 8, 8)
    opt = optic.optimize(m, (x,), target="h100")
    assert not opt.report.pass_record("cpu_tactics").changed
    opt = optic.optimize(m, (x,), measure=False)
    assert "measurement" in opt.report.declines("cpu_tactics")[0]["reason"]
