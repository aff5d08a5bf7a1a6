"""``optic.ir.emit``: what each helper writes (the ATen spelling, or the one spelling that can express the
op), and that it computes what the module or functional spelling it stands for computes.

A conv is emitted from the op view's own hyper-parameters of a traced module, so the round trip
(module -> op view -> emitted ATen) is what is checked, over the conv variants that bit others:
transposed, grouped, 1-D/3-D, non-zero padding modes, and the asymmetric 'same' padding only the
functional spelling expresses.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from optic.ir import emit
from optic.ir.opview import view

aten = torch.ops.aten


def build(fn, *shapes: tuple[int, ...]) -> tuple[fx.GraphModule, fx.Node]:
    """A graph module whose inputs have ``shapes`` and whose output is what ``fn(graph, gm, *inputs)`` emits."""
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    graph = gm.graph
    xs = [graph.placeholder(f"x{i}") for i in range(len(shapes))]
    out = fn(graph, gm, *xs)
    graph.output(out)
    gm.recompile()
    return gm, out


def targets_of(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# -- conv ------------------------------------------------------------------------------------------------

CONVS = {
    "2d": (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (2, 4, 9, 9)),
    "2d grouped dilated": (nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2), (1, 4, 8, 8)),
    "1d": (nn.Conv1d(3, 5, 4, padding=1), (2, 3, 10)),
    "3d": (nn.Conv3d(2, 3, 3, padding=1, stride=(1, 2, 2)), (1, 2, 5, 6, 6)),
    "transposed": (nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1), (1, 4, 5, 5)),
    "transposed grouped": (nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (1, 4, 3, 3)),
    "reflect": (nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode="reflect"), (1, 3, 7, 7)),
    "circular": (nn.Conv1d(3, 4, 3, padding=1, padding_mode="circular"), (2, 3, 8)),
    "replicate": (nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), (1, 3, 6, 6)),
}


def _emitted_conv(module: nn.Module, shape: tuple[int, ...]) -> tuple[fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    module = module.eval()
    traced = fx.symbolic_trace(nn.Sequential(module))
    op = next(o for o in (view(n, traced) for n in traced.graph.nodes) if o is not None and o.kind == "conv")
    gm, _ = build(lambda g, m, x: emit.conv(g, x, emit.constant(g, m, module.weight.detach(), "w"),
                                            emit.constant(g, m, module.bias.detach(), "b"), op.attrs), shape)
    x = torch.randn(shape)
    return gm, x


@pytest.mark.parametrize("name", list(CONVS))
def test_a_conv_emitted_from_its_op_view_computes_the_module(name):
    module, shape = CONVS[name]
    gm, x = _emitted_conv(module, shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)
    called = targets_of(gm)
    assert called[-1] is aten.convolution.default
    node = next(n for n in gm.graph.nodes if n.target is aten.convolution.default)
    transposed, groups = node.args[6], node.args[8]
    assert transposed == isinstance(module, nn.modules.conv._ConvTransposeNd) and groups == module.groups
    if module.padding_mode == "zeros":
        assert called == [aten.convolution.default]
    else:  # the padding mode becomes an explicit pad, and the conv pads nothing itself
        assert called == [F.pad, aten.convolution.default] and node.args[4] == [0] * len(module.kernel_size)
        pad_node = next(n for n in gm.graph.nodes if n.target is F.pad)
        assert pad_node.args[2] == module.padding_mode


def test_asymmetric_same_padding_keeps_the_functional_spelling():
    """'same' with an even kernel pads one side more: the ATen conv cannot say so, F.conv2d can."""
    module, shape = nn.Conv2d(3, 4, (2, 4), padding="same"), (1, 3, 7, 7)
    gm, x = _emitted_conv(module, shape)
    assert targets_of(gm) == [F.conv2d]
    assert next(n for n in gm.graph.nodes if n.target is F.conv2d).args[4] == "same"
    with torch.no_grad():
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)


# -- the other ops ---------------------------------------------------------------------------------------


def test_linear_and_the_norms_are_their_aten_ops():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
    gm, _ = build(lambda g, m, x: emit.linear(g, x, emit.constant(g, m, w, "w"), emit.constant(g, m, b, "b")), (3, 5))
    assert targets_of(gm) == [aten.linear.default]
    torch.testing.assert_close(gm(x), F.linear(x, w, b))

    gm, _ = build(lambda g, m, x: emit.layer_norm(g, x, (5,), 1e-3), (3, 5))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert node.target is aten.layer_norm.default and node.args[1:] == ([5], None, None, 1e-3)
    torch.testing.assert_close(gm(x), F.layer_norm(x, (5,), eps=1e-3))

    for eps in (1e-6, None):
        gm, _ = build(lambda g, m, x, eps=eps: emit.rms_norm(g, x, [5], eps), (3, 5))
        assert targets_of(gm) == [aten.rms_norm.default]
        torch.testing.assert_close(gm(x), F.rms_norm(x, (5,), eps=eps))


def test_scale_shift_is_one_addcmul():
    torch.manual_seed(0)
    x, s, t = torch.randn(2, 3, 4, 4), torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1)
    gm, _ = build(lambda g, m, x: emit.scale_shift(g, x, emit.constant(g, m, s, "s"), emit.constant(g, m, t, "t")),
                  x.shape)
    assert targets_of(gm) == [aten.addcmul.default]
    torch.testing.assert_close(gm(x), x * s + t)


def test_split_last_gives_one_getitem_per_piece_and_transpose_last_swaps_the_last_two():
    x = torch.arange(24.0).reshape(2, 3, 4)
    gm, _ = build(lambda g, m, x: tuple(emit.split_last(g, x, [1, 3])), x.shape)
    assert targets_of(gm) == [aten.split_with_sizes.default, operator.getitem, operator.getitem]
    a, b = gm(x)
    assert torch.equal(a, x[..., :1]) and torch.equal(b, x[..., 1:])
    gm, _ = build(lambda g, m, x: emit.transpose_last(g, x), x.shape)
    assert targets_of(gm) == [aten.transpose.int] and torch.equal(gm(x), x.transpose(-2, -1))


def test_sdpa_takes_a_number_or_a_node_as_its_scale():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    want = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    gm, out = build(lambda g, m, q, k, v: emit.sdpa(g, q, k, v, None, 0.3), q.shape, k.shape, v.shape)
    assert out.target is aten.scaled_dot_product_attention.default and out.kwargs == {"scale": 0.3}
    torch.testing.assert_close(gm(q, k, v), want)

    def scale_from_shape(g, m, q, k, v):  # a scale computed in the graph (1/sqrt of the head size)
        d = g.call_function(operator.getitem, (g.call_method("size", (q,)), -1))
        return emit.sdpa(g, q, k, v, None, g.call_function(operator.pow, (d, -0.5)))

    gm, out = build(scale_from_shape, q.shape, k.shape, v.shape)
    assert isinstance(out.kwargs["scale"], fx.Node)
    torch.testing.assert_close(gm(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize(("fn", "attrs", "target", "reference"), [
    ("relu", {}, aten.relu.default, F.relu),
    ("silu", {}, aten.silu.default, F.silu),
    ("hardtanh", {"min_val": -0.5, "max_val": 2.0}, aten.hardtanh.default, lambda x: F.hardtanh(x, -0.5, 2.0)),
    ("leaky_relu", {"negative_slope": 0.2}, aten.leaky_relu.default, lambda x: F.leaky_relu(x, 0.2)),
    ("gelu", {"approximate": "tanh"}, aten.gelu.default, lambda x: F.gelu(x, approximate="tanh")),
    ("gelu", {}, aten.gelu.default, F.gelu),
    ("elu", {"alpha": 0.7}, aten.elu.default, lambda x: F.elu(x, 0.7)),
    ("elu", {}, aten.elu.default, F.elu),
])
def test_an_activation_keeps_its_hyper_parameters(fn, attrs, target, reference):
    x = torch.linspace(-3, 3, 25)
    gm, _ = build(lambda g, m, x: emit.activation(g, x, fn, attrs), x.shape)
    assert targets_of(gm) == [target]
    torch.testing.assert_close(gm(x), reference(x))


def test_a_constant_is_a_get_attr_of_the_tensor_and_none_stays_none():
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    t = torch.randn(3)
    assert emit.constant(gm.graph, gm, None, "bias") is None
    node = emit.constant(gm.graph, gm, t, "bias")
    assert node.op == "get_attr" and "bias" in node.target
    assert torch.equal(getattr(gm, node.target), t)
