"""The op view sees one op whatever its spelling: module, functional, tensor method or ATen."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from optic.ir.opview import view


def _kinds(model, x, capture):
    if capture == "fx":
        gm = fx.symbolic_trace(model)
    else:
        gm = torch.export.export(model, (x,), strict=False).module()
    out = []
    for n in gm.graph.nodes:
        op = view(n, gm)
        if op is not None:
            out.append((op.kind, op.attrs.get("fn")))
    return out, gm


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.bn = nn.BatchNorm2d(4)
        self.lin = nn.Linear(4, 4)
        self.wl = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = self.conv(x)                      # module
        y = F.conv2d(y, self.w)               # functional
        y = self.bn(y)
        y = F.relu(y)
        y = y.sigmoid()                       # method
        y = y.mean((2, 3))
        y = self.lin(y)
        y = F.linear(y, self.wl)
        y = F.gelu(y, approximate="tanh")
        return torch.softmax(y @ y.t(), -1)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_same_ops_in_both_spellings(capture):
    kinds, _ = _kinds(Spellings().eval(), torch.randn(2, 3, 8, 8), capture)
    wanted = [("conv", None), ("conv", None), ("batch_norm", None), ("act", "relu"), ("act", "sigmoid"),
              ("mean", None), ("linear", None), ("linear", None), ("act", "gelu"), ("transpose", None)]
    got = [k for k in kinds if k[0] in {w[0] for w in wanted}]
    assert [k for k in got if k[0] != "transpose"] == [w for w in wanted if w[0] != "transpose"]
    assert ("softmax", None) in kinds and ("matmul", None) in kinds


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_conv_hyperparameters_are_normalized(capture):
    m = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, output_padding=1)).eval()
    kinds, gm = _kinds(m, torch.randn(1, 4, 5, 5), capture)
    op = next(view(n, gm) for n in gm.graph.nodes if view(n, gm) is not None and view(n, gm).kind == "conv")
    assert op.attrs["transposed"] is True
    assert op.attrs["groups"] == 2
    assert op.attrs["stride"] == [2, 2] and op.attrs["padding"] == [1, 1] and op.attrs["output_padding"] == [1, 1]
    assert op.const("weight").shape == (4, 3, 3, 3)


def test_addmm_with_constant_weight_is_a_linear():
    class Conv1D(nn.Module):  # GPT-2's transposed-weight linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 7))
            self.bias = nn.Parameter(torch.randn(7))

        def forward(self, x):
            return torch.addmm(self.bias, x.view(-1, 5), self.weight)

    gm = torch.export.export(Conv1D(), (torch.randn(3, 5),), strict=False).module()
    ops = [view(n, gm) for n in gm.graph.nodes]
    lin = next(o for o in ops if o is not None and o.kind == "linear")
    assert lin.const("weight").shape == (7, 5)  # (out, in), as a linear's


def test_batchnorm_training_and_no_running_stats_are_seen():
    m = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    gm = fx.symbolic_trace(m)
    bns = [view(n, gm) for n in gm.graph.nodes if n.op == "call_module"]
    assert [b.attrs["training"] for b in bns] == [False, True]


def test_string_padding_same_becomes_integers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 2, 3, 5))

        def forward(self, x):
            return F.conv2d(x, self.w, padding="same")

    gm = fx.symbolic_trace(M())
    op = next(view(n, gm) for n in gm.graph.nodes if n.op == "call_function")
    assert op.attrs["padding"] == [1, 2]
