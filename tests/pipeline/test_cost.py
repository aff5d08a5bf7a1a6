"""Cost: FLOP counts against the textbook formulas, symbolic batch, roofline ordering."""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

import optic
from optic.pipeline import cost


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


# -- every spelling of an op costs the same ------------------------------------------------------------
def _shaped(gm: fx.GraphModule, *inputs) -> optic.Program:
    ShapeProp(gm).propagate(*inputs)
    return optic.Program(gm, "fx", inputs)


def _kernel_graph(target, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *rest, weight_as="constant"):
    """x → target(x, weight, bias, *rest), the weight a get_attr of the tensor or the output of a module the
    graph calls (a weight packed on first use)."""
    root, g = nn.Module(), fx.Graph()
    xn = g.placeholder("x")
    if weight_as == "constant":
        root.w = weight
        w = g.get_attr("w")
    else:
        class Packs(nn.Module):
            def forward(self):
                return weight
        root.pack = Packs()
        w = g.call_module("pack", ())
    root.register_buffer("b", bias)
    g.output(g.call_function(target, (xn, w, g.get_attr("b"), *rest)))
    return _shaped(fx.GraphModule(root, g), x)


@pytest.mark.parametrize("weight_as", ["constant", "module"])
@pytest.mark.parametrize("groups,act", [(1, "relu"), (2, "none"), (4, "swish")])
def test_onednn_conv_costs_what_the_aten_conv_and_activation_cost(groups, act, weight_as):
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=groups).eval()
    x = torch.randn(2, 8, 9, 9)
    fn = {"relu": nn.ReLU(), "none": nn.Identity(), "swish": nn.SiLU()}[act]
    aten = optic.capture(nn.Sequential(conv, fn).eval(), (x,))
    packed = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), [1, 1], [2, 2], [1, 1], groups,
                                                          list(x.shape))  # opaque, blocked; reports (12, 8/g, 3, 3)
    onednn = _kernel_graph(torch.ops.mkldnn._convolution_pointwise.default, x, packed, conv.bias.detach(),
                           [1, 1], [2, 2], [1, 1], groups, act, [None], "", weight_as=weight_as)
    out = 2 * 12 * 5 * 5
    expected = 2 * out * (8 // groups) * 9 + out * {"relu": 1, "none": 0, "swish": 2}[act]
    assert cost.total_flops(onednn) == cost.total_flops(aten) == expected


def test_onednn_linear_costs_the_linear_and_its_fused_gelu():
    lin = nn.Linear(16, 24).eval()
    x = torch.randn(3, 16)
    aten = optic.capture(nn.Sequential(lin, nn.GELU(approximate="tanh")).eval(), (x,))
    onednn = _kernel_graph(torch.ops.mkldnn._linear_pointwise.default, x, lin.weight.detach(), lin.bias.detach(),
                           "gelu", [None], "tanh")
    assert cost.total_flops(onednn) == cost.total_flops(aten) == 2 * 3 * 24 * 16 + 3 * 24 * 8


class Attention(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        self.fused = fused
        self.register_buffer("mask", torch.randn(1, 1, 6, 5))

    def forward(self, q, k, v):
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=0.3)
        return F.softmax(q @ k.transpose(-2, -1) * 0.3 + self.mask, dim=-1) @ v


def test_sdpa_costs_what_attention_written_out_costs():
    q, k, v = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 4)
    fused, plain = (cost.total_flops(optic.capture(Attention(f), (q, k, v))) for f in (True, False))
    scores = 2 * 3 * 6 * 5
    assert fused == plain == scores * (2 * 8 + 1 + 1 + 5 + 2 * 4)


class GeluNew(nn.Module):
    def forward(self, x):  # GPT-2's gelu_new, which fuse's gelu_tanh rule turns into one gelu
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def test_fused_gelu_costs_what_the_written_out_formula_costs():
    x = torch.randn(4, 10)
    written = cost.total_flops(optic.capture(GeluNew(), (x,)))
    fused = cost.total_flops(optic.capture(nn.GELU(approximate="tanh"), (x,)))
    assert written == fused == 8 * 40
    assert cost.activation_flops("gelu") < cost.activation_flops("gelu", "tanh")


class Kernel(nn.Module):
    """A module the op view does not know that says what it computes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(6, 10))

    def forward(self, x):
        return torch.relu(x @ self.weight.t())

    def flops(self, out_shape):
        return cost.kernel_flops(out_shape, tuple(self.weight.shape), ("bias", "relu"))


def test_a_module_that_declares_its_flops_is_counted_and_symbolic_in_the_batch():
    root, g = nn.Module(), fx.Graph()
    root.kernel = Kernel()
    g.output(g.call_module("kernel", (g.placeholder("x"),)))
    p = _shaped(fx.GraphModule(root, g), torch.randn(4, 10))
    assert cost.total_flops(p) == 4 * 6 * (2 * 10 + 1)
    assert sympy.expand(cost.symbolic_batch_flops(p) - cost.BATCH * 6 * 21) == 0


def test_a_weight_read_through_the_graph_is_not_counted_twice():
    conv = nn.Sequential(nn.Conv2d(4, 8, 3)).eval()
    x = torch.randn(1, 4, 6, 6)
    module = optic.capture(conv, (x,))  # nn.Conv2d: the weight lives in the module
    functional = optic.capture(conv, (x,), method="export")  # aten.convolution reading a weight node
    target = optic.targets.get("cpu")
    assert cost.node_cost(next(n for n in module.gm.graph.nodes if n.op == "call_module"), module.gm).bytes == \
        next(c.bytes for n in functional.gm.graph.nodes if (c := cost.node_cost(n, functional.gm)) and c.flops)
    assert cost.roofline_seconds(module, target) == pytest.approx(cost.roofline_seconds(functional, target))
