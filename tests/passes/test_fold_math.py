"""The folding math alone, on tensors, before any graph surgery."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optic.passes.fold_norm import bn_scale_shift, fold_input_affine, fold_output_affine
from optic.passes.fuse import merge_linears


def _bn(c):
    bn = nn.BatchNorm1d(c).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_bn_fold_into_conv_matches(nd, transposed, groups, bias):
    c_in, c_out = 8, 12 if groups != 4 else 8
    conv_cls = [None, (nn.Conv1d, nn.ConvTranspose1d), (nn.Conv2d, nn.ConvTranspose2d), (nn.Conv3d, nn.ConvTranspose3d)][nd]
    conv = conv_cls[transposed](c_in, c_out, 3, padding=1, groups=groups, bias=bias).eval()
    bn = _bn(c_out)
    x = torch.randn(2, c_in, *([6] * nd))
    expected = F.batch_norm(conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    s, t = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    w, b = fold_output_affine(conv.weight, conv.bias, s, t, transposed=transposed, groups=groups)
    fn = getattr(F, f"conv_transpose{nd}d" if transposed else f"conv{nd}d")
    got = fn(x, w, b, padding=1, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_transposed_grouped_fold_uses_per_group_axis():
    """The bug class of ultralytics#25364: the output axis of a grouped transposed conv is dim 1 per group."""
    conv = nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False)
    s = torch.arange(1.0, 7.0, dtype=torch.float64)
    w, _ = fold_output_affine(conv.weight, None, s, torch.zeros(6, dtype=torch.float64), transposed=True, groups=2)
    # group 0 owns input channels 0,1 and output channels 0..2; group 1 inputs 2,3, outputs 3..5
    torch.testing.assert_close(w[0, 2], conv.weight[0, 2] * 3)
    torch.testing.assert_close(w[2, 0], conv.weight[2, 0] * 4)


def test_bn_fold_into_linear_matches():
    lin, bn = nn.Linear(5, 7), _bn(7)
    x = torch.randn(4, 5)
    s, t = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    w, b = fold_output_affine(lin.weight, lin.bias, s, t)
    torch.testing.assert_close(F.linear(x, w, b), bn(lin(x)), rtol=1e-5, atol=1e-5)


def test_fold_runs_in_float64_and_keeps_dtype():
    conv = nn.Conv2d(3, 4, 1).to(torch.bfloat16)
    bn = _bn(4)
    s, t = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    assert s.dtype == torch.float64
    w, b = fold_output_affine(conv.weight, conv.bias, s, t)
    assert w.dtype == b.dtype == torch.bfloat16


@pytest.mark.parametrize("with_beta", [True, False])
def test_norm_affine_into_linear_matches(with_beta):
    ln, lin = nn.LayerNorm(6), nn.Linear(6, 3)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(5, 6)
    beta = ln.bias if with_beta else None
    expected = lin(F.layer_norm(x, (6,)) * ln.weight + (ln.bias if with_beta else 0))
    w, b = fold_input_affine(lin.weight, lin.bias, ln.weight, beta)
    torch.testing.assert_close(F.linear(F.layer_norm(x, (6,)), w, b), expected, rtol=1e-5, atol=1e-5)


def test_merge_linears_matches():
    a, b = nn.Linear(6, 2), nn.Linear(2, 5)
    x = torch.randn(3, 6)
    w, bias = merge_linears(a.weight, a.bias, b.weight, b.bias)
    assert w.shape == (5, 6)
    torch.testing.assert_close(F.linear(x, w, bias), b(a(x)), rtol=1e-5, atol=1e-5)
