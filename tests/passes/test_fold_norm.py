"""fold_norm: BN into conv/linear, standalone BN to scale-shift, norm affine into linears; and every
case where it must not fold, with the reason in the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import op_kinds, run_exact
from strategies import randomize_bn

from optic.ir.capture import capture as capture_program
from optic.ir.opview import view

G = torch.Generator().manual_seed(0)
CAPTURES = ["fx", "export"]


def _bn2d(c):
    return randomize_bn(nn.BatchNorm2d(c), G)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(4, 8, 3, padding=1),
    lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False),
    lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
    lambda: nn.ConvTranspose2d(4, 8, 3, stride=2, groups=2),
    lambda: nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"),
])
def test_bn_folds_into_conv(conv, capture):
    c = conv()
    m = nn.Sequential(c, _bn2d(c.out_channels), nn.ReLU()).eval()
    opt = run_exact(m, (torch.randn(2, 4, 8, 8),), capture)
    assert opt.report.matched("bn_into_conv_or_linear") == 1
    assert "batch_norm" not in op_kinds(opt.program.gm)


@pytest.mark.parametrize("capture", CAPTURES)
def test_bn_folds_into_conv1d_conv3d_and_linear(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv1d(3, 5, 3), randomize_bn(nn.BatchNorm1d(5), G)
            self.c3, self.b3 = nn.Conv3d(3, 5, 1), randomize_bn(nn.BatchNorm3d(5), G)
            self.fc, self.bf = nn.Linear(5, 6), randomize_bn(nn.BatchNorm1d(6), G)

        def forward(self, x1, x3):
            a = self.b1(self.c1(x1)).mean(-1)
            b = self.b3(self.c3(x3)).mean((2, 3, 4))
            return self.bf(self.fc(a + b))

    opt = run_exact(M().eval(), (torch.randn(2, 3, 9), torch.randn(2, 3, 4, 4, 4)), capture)
    assert opt.report.matched("bn_into_conv_or_linear") == 3


@pytest.mark.parametrize("capture", CAPTURES)
def test_shared_producer_is_not_folded(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), _bn2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    opt = run_exact(M().eval(), (torch.randn(1, 3, 6, 6),), capture)
    rep = opt.report
    assert rep.matched("bn_into_conv_or_linear") == 0
    assert any("users" in d["reason"] for d in rep.declines("bn_into_conv_or_linear"))
    assert rep.matched("bn_to_scale_shift") == 1  # still cheaper: one addcmul


@pytest.mark.parametrize("capture", CAPTURES)
def test_bn_with_batch_statistics_is_not_folded(capture):
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    opt = run_exact(m, (torch.randn(2, 3, 5, 5),), capture)
    assert opt.report.matched("bn_into_conv_or_linear") == 0
    assert "batch statistics" in opt.report.declines("bn_into_conv_or_linear")[0]["reason"]


def test_bn_in_training_mode_is_kept_when_training_semantics_are_asked_for():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), _bn2d(4)).train()
    x = torch.randn(4, 3, 5, 5)
    import optic

    opt = optic.optimize(m, (x,), inference=False, measure=False, passes=["fold_norm"])
    assert opt.report.matched("bn_into_conv_or_linear") == 0
    assert "training mode" in opt.report.declines("bn_into_conv_or_linear")[0]["reason"]
    # and by default the model is optimized in eval semantics, and the report says so
    opt = optic.optimize(m, (x,), measure=False, passes=["fold_norm"])
    assert opt.report.matched("bn_into_conv_or_linear") == 1
    assert any("training mode" in n for n in opt.report.notes)
    assert m.training, "the user's model must keep its mode"


@pytest.mark.parametrize("capture", CAPTURES)
def test_tied_weight_is_not_duplicated(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.bn = _bn2d(3)

        def forward(self, x):
            y = self.bn(self.a(x))
            return torch.nn.functional.conv2d(y, self.a.weight)  # same weight again

    opt = run_exact(M().eval(), (torch.randn(1, 3, 4, 4),), capture)
    assert opt.report.matched("bn_into_conv_or_linear") == 0
    assert "tied" in opt.report.declines("bn_into_conv_or_linear")[0]["reason"]
    assert opt.report.params[1] <= opt.report.params[0]


@pytest.mark.parametrize("capture", CAPTURES)
def test_linear_bn_on_sequence_is_not_folded(capture):
    """BN1d on (N, C, L) normalizes dim 1; a linear's features are the last dim."""
    m = nn.Sequential(nn.Linear(4, 4), randomize_bn(nn.BatchNorm1d(3), G)).eval()
    opt = run_exact(m, (torch.randn(2, 3, 4),), capture)
    assert opt.report.matched("bn_into_conv_or_linear") == 0


@pytest.mark.parametrize("capture", CAPTURES)
def test_layernorm_affine_folds_into_all_linear_readers(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            nn.init.normal_(self.ln.weight)
            nn.init.normal_(self.ln.bias)
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            h = self.ln(x)
            return self.q(h).sum(-1) + self.k(h.reshape(-1, 3, 8)).sum(-1).reshape(2, 3)

    opt = run_exact(M().eval(), (torch.randn(2, 3, 8),), capture, passes=["cleanup", "fold_norm"])
    assert opt.report.matched("norm_affine_into_linear") == 1


@pytest.mark.parametrize("capture", CAPTURES)
def test_handwritten_rmsnorm_weight_folds(capture):
    class RMS(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.proj(self.weight * h)

    opt = run_exact(RMS(), (torch.randn(2, 8),), capture, passes=["cleanup", "fold_norm"])
    assert opt.report.matched("norm_affine_into_linear") == 1
    assert op_kinds(opt.program.gm).count("mul") == 1  # x·rsqrt(...) stays; ·weight is gone


@pytest.mark.parametrize("capture", CAPTURES)
def test_norm_feeding_a_residual_is_not_folded(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.ln(x)
            return h + self.fc(h)

    opt = run_exact(M(), (torch.randn(2, 4),), capture)
    assert opt.report.matched("norm_affine_into_linear") == 0
    assert "not only linears" in opt.report.declines("norm_affine_into_linear")[0]["reason"]


# -- before / expected ------------------------------------------------------------------------------
class ConvBnMlp(nn.Module):
    """Each fold once: conv+BN, a BN after an add (no producer to fold into), a LayerNorm read by two linears."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.bn2 = nn.Conv2d(3, 8, 3, padding=1), _bn2d(8), _bn2d(8)
        self.fc, self.ln, self.q, self.k = nn.Linear(8, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 4)
        nn.init.normal_(self.ln.weight)
        nn.init.normal_(self.ln.bias)

    def forward(self, x):
        y = self.bn2(torch.relu(self.bn(self.conv(x))) + 1)
        h = self.ln(self.fc(y.mean((2, 3))))
        return self.q(h) * self.k(h)


@pytest.mark.parametrize("capture", CAPTURES)
def test_before_expected_every_fold(capture):
    m, x = ConvBnMlp().eval(), (torch.randn(2, 3, 5, 5),)
    assert op_kinds(capture_program(m, x, method=capture).gm) == [
        "conv", "batch_norm", "act:relu", "add", "batch_norm", "mean", "linear", "layer_norm", "linear", "linear", "mul"]
    opt = run_exact(m, x, capture, passes=["fold_norm"])
    assert op_kinds(opt.program.gm) == [
        "conv", "act:relu", "add", "addcmul.default", "mean", "linear", "layer_norm", "linear", "linear", "mul"]
    assert opt.report.pass_record("fold_norm").matched == {
        "bn_into_conv_or_linear": 1, "bn_to_scale_shift": 1, "norm_affine_into_linear": 1}
    gm = opt.program.gm
    ln = next(op for n in gm.graph.nodes if (op := view(n, gm)) is not None and op.kind == "layer_norm")
    assert ln.const("weight") is None and ln.const("bias") is None, "the affine moved into q and k"


@pytest.mark.parametrize("capture", CAPTURES)
def test_declines_name_the_node_that_stays(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.ln, self.fc = nn.Conv2d(3, 4, 1), _bn2d(4), nn.LayerNorm(5), nn.Linear(5, 5)

        def forward(self, x):
            y = self.conv(x)
            h = self.ln(self.bn(y) + y)  # conv read twice; the norm also feeds the residual
            return h + self.fc(h)

    m, x = M().eval(), (torch.randn(2, 3, 5, 5),)
    gm = capture_program(m, x, method=capture).gm
    kinds = dict(zip([n.name for n in gm.graph.nodes if n.op.startswith("call")], op_kinds(gm), strict=True))
    opt = run_exact(m, x, capture, passes=["fold_norm"])
    declined = {d["rule"]: d for d in opt.report.declines()}
    assert kinds[declined["bn_into_conv_or_linear"]["node"]] == "batch_norm"
    assert "users" in declined["bn_into_conv_or_linear"]["reason"]
    assert kinds[declined["norm_affine_into_linear"]["node"]] == "layer_norm"
    assert "not only linears" in declined["norm_affine_into_linear"]["reason"]
