"""int8 kernels as PyTorch operators, and the integer reference they are held to.

The scheme is the one x86 int8 kernels compute (oneDNN's, which Inductor and ONNX Runtime's QDQ models
also use on this ISA):

- weights: int8, symmetric, one scale per output channel, ``q_w = round(W / s_w)`` in [-127, 127];
- activations: uint8, one scale and zero point per tensor, ``q_x = clamp(round(x / s_x) + z_x, 0, 255)``;
- the kernel: ``acc[c] = Σ (q_x − z_x)·q_w[c]`` in int32 (exact), ``y = acc·(s_x·s_w[c]) + b[c]``, then
  the fused activation, then either float32 out or requantized to uint8 for the next int8 layer:
  ``clamp(round(y / s_out) + z_out, 0, 255)``.

``torch.ops.optic.int8_conv2d`` and ``torch.ops.optic.int8_linear`` take the plain int8 weight (a
constant of the graph: ``state_dict``, copies and pickles see a plain tensor) and run oneDNN's kernel on
it packed into oneDNN's blocked layout, packed once per weight, batch shape and scales and kept in a
cache that forgets a weight with the weight (and repacks it after an in-place edit). They are custom
operators with shape functions, so ``torch.compile`` (Inductor, freezing) and ``torch.export`` treat
them as opaque calls and compile the float work around them. ``import optic`` registers them (a saved
optimized model needs it to load).

:func:`conv_reference` and :func:`linear_reference` compute the same integers in float64 (exact for any
layer with fewer than 2^53 / (255·127) ≈ 2.8e11 products per output).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from optic.ir import fetch_attr

WEIGHT_MAX = 127
_CACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


# -- the integer math -----------------------------------------------------------------------------------
def weight_scales(w: Tensor) -> Tensor:
    """Per-output-channel symmetric scales (float32): ``max|W[c]| / 127`` (1 for an all-zero channel)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).double()
    return torch.where(amax > 0, amax / WEIGHT_MAX, torch.ones_like(amax)).float()


def quantize_weight(w: Tensor, scales: Tensor) -> Tensor:
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.round(w.detach().double() / scales.double().reshape(shape)).clamp(-WEIGHT_MAX, WEIGHT_MAX).to(torch.int8)


@torch.library.custom_op("optic::quantize_u8", mutates_args=())
def _quantize_u8(x: Tensor, scale: float, zero_point: int, channels_last: bool = False) -> Tensor:
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    if channels_last:  # a conv input: 4-D
        return q.to(torch.uint8, memory_format=torch.channels_last)
    return q.to(torch.uint8)


@_quantize_u8.register_fake
def _(x, scale, zero_point, channels_last=False):
    return torch.empty_like(x, dtype=torch.uint8,
                            memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ``quantize_u8(x, scale, zero_point, channels_last=False)``: ``clamp(round(x / scale) + zero_point, 0, 255)`` as
# uint8 (round half to even, as the kernels). ``channels_last``: written NHWC, the layout oneDNN's int8
# convolutions read (an NCHW input costs them a reorder per call: 1.9× the time of a 1×1 conv 128→512 at 28×28
# here). An operator, not a Python function: a graph keeps it as one node through pickling and optic.load (fx
# traces a pickled graph's code again, and traced the function's five ops into the graph in its place, where
# neither the int8 kernels' fused quantize nor Inductor's int8 patterns find it)
quantize_u8 = torch.ops.optic.quantize_u8.default


@torch.library.custom_op("optic::dequantize_u8", mutates_args=())
def _dequantize_u8(q: Tensor, scale: float, zero_point: int) -> Tensor:
    return (q.to(torch.float32) - zero_point) * scale


@_dequantize_u8.register_fake
def _(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


# ``dequantize_u8(q, scale, zero_point)``: ``(q − zero_point)·scale`` in float32 (``quantized_decomposed``'s
# dequantize_per_tensor, to which :func:`as_qdq` turns it): a residual add reading the int8 value a
# convolution's input was quantized to (quantize's ``ResidualFromQuantized``)
dequantize_u8 = torch.ops.optic.dequantize_u8.default


def fake_quantize(x: Tensor, scale: float, zero_point: int) -> Tensor:
    return (quantize_u8(x, scale, zero_point).double() - zero_point) * scale


def post_op(y: Tensor, attr: str, scalars: list[float] = (), algo: str = "") -> Tensor:
    """The activation an int8 kernel fuses (oneDNN's post-op names)."""
    f = torch.nn.functional
    ops = {"none": lambda: y, "relu": y.relu, "gelu": lambda: f.gelu(y, approximate=algo or "none"),
           "swish": lambda: f.silu(y), "sigmoid": y.sigmoid, "tanh": y.tanh,
           "hardtanh": lambda: y.clamp(scalars[0], scalars[1])}
    if attr not in ops:
        raise ValueError(f"unknown post-op {attr!r}; known: {sorted(ops)}")
    return ops[attr]()


def _requantize(y: Tensor, out: tuple[float, int] | None) -> Tensor:
    return y.float() if out is None else quantize_u8(y, *out)


def conv_reference(qx: Tensor, x_scale: float, x_zp: int, qw: Tensor, w_scales: Tensor, bias: Tensor | None,
                   stride, padding, dilation, groups: int, post: tuple = ("none", [], ""),
                   out: tuple[float, int] | None = None) -> Tensor:
    """What :func:`int8_conv2d` computes, the accumulation exact in float64."""
    acc = torch.nn.functional.conv2d(qx.double() - x_zp, qw.double(), None, stride, padding, dilation, groups)
    y = acc * (x_scale * w_scales.double()).reshape(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.double().reshape(1, -1, 1, 1)
    return _requantize(post_op(y, *post), out)


def linear_reference(qx: Tensor, x_scale: float, x_zp: int, qw: Tensor, w_scales: Tensor, bias: Tensor | None,
                     post: tuple = ("none", [], ""), out: tuple[float, int] | None = None) -> Tensor:
    acc = (qx.double() - x_zp) @ qw.double().t()
    y = acc * (x_scale * w_scales.double())
    if bias is not None:
        y = y + bias.double()
    return _requantize(post_op(y, *post), out)


# -- the kernels ------------------------------------------------------------------------------------------
def _packed(qweight: Tensor, key: tuple, pack) -> tuple[Tensor, Tensor]:
    """(packed weight, weight zero points) for ``qweight``, packed once per ``key``."""
    full = (qweight.data_ptr(), qweight._version, tuple(qweight.shape)) + key
    hit = _CACHE.get(full)
    if hit is None:
        hit = (pack(), torch.zeros(qweight.shape[0], dtype=torch.int64, device="cpu"))
        _CACHE[full] = hit
        weakref.finalize(qweight, _CACHE.pop, full, None)  # the weight's memory may be reused by another
    return hit


def _out(out_scale: float, out_zp: int, out_u8: bool) -> tuple[float, int, torch.dtype | None]:
    # oneDNN: a float output takes scale 1 and zero point 0; a uint8 one is requantized in the epilogue
    return (out_scale, out_zp, None) if out_u8 else (1.0, 0, torch.float32)


@torch.library.custom_op("optic::int8_conv2d", mutates_args=())
def int8_conv2d(xq: Tensor, x_scale: float, x_zp: int, qweight: Tensor, w_scales: Tensor, bias: Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int], groups: int, out_scale: float,
                out_zp: int, out_u8: bool, attr: str, scalars: list[float], algo: str) -> Tensor:
    """A 2-D int8 convolution (see the module doc): uint8 ``xq`` [N, C, H, W], int8 ``qweight`` [O, C/g, kh, kw]."""
    shape = list(xq.shape)
    packed, w_zp = _packed(qweight, ("conv", x_scale, x_zp, tuple(stride), tuple(padding), tuple(dilation), groups,
                                     tuple(shape)),
                           lambda: torch.ops.onednn.qconv_prepack(qweight, w_scales, x_scale, x_zp, stride, padding,
                                                                  dilation, groups, shape))
    return torch.ops.onednn.qconv2d_pointwise(xq, x_scale, x_zp, packed, w_scales, w_zp, bias, stride, padding,
                                              dilation, groups, *_out(out_scale, out_zp, out_u8), attr,
                                              list(scalars) or [None], algo)


@int8_conv2d.register_fake
def _(xq, x_scale, x_zp, qweight, w_scales, bias, stride, padding, dilation, groups, out_scale, out_zp, out_u8,
      attr, scalars, algo):
    n, _, h, w = xq.shape
    o, _, kh, kw = qweight.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = xq.new_empty((n, o, oh, ow), dtype=torch.uint8 if out_u8 else torch.float32)
    return out.contiguous(memory_format=torch.channels_last)  # what oneDNN writes


@torch.library.custom_op("optic::int8_linear", mutates_args=())
def int8_linear(xq: Tensor, x_scale: float, x_zp: int, qweight: Tensor, w_scales: Tensor, bias: Tensor | None,
                out_scale: float, out_zp: int, out_u8: bool, attr: str, scalars: list[float], algo: str) -> Tensor:
    """An int8 linear (see the module doc): uint8 ``xq`` [..., K], int8 ``qweight`` [N, K]."""
    packed, w_zp = _packed(qweight, ("linear",), lambda: torch.ops.onednn.qlinear_prepack(qweight, None))
    return torch.ops.onednn.qlinear_pointwise(xq, x_scale, x_zp, packed, w_scales, w_zp, bias,
                                              *_out(out_scale, out_zp, out_u8), attr, list(scalars) or [None],
                                              algo or "none")


@int8_linear.register_fake
def _(xq, x_scale, x_zp, qweight, w_scales, bias, out_scale, out_zp, out_u8, attr, scalars, algo):
    return xq.new_empty((*xq.shape[:-1], qweight.shape[0]), dtype=torch.uint8 if out_u8 else torch.float32)


CONV = torch.ops.optic.int8_conv2d.default
LINEAR = torch.ops.optic.int8_linear.default
# where each kernel's output scale, zero point and "uint8 out" flag sit in its arguments
OUT_ARGS = {CONV: (10, 11, 12), LINEAR: (6, 7, 8)}


# -- the same kernels as Inductor's int8 patterns ---------------------------------------------------------
_POST_ATEN = {"relu": lambda y, s, a: (torch.ops.aten.relu.default, (y,), {}),
              "gelu": lambda y, s, a: (torch.ops.aten.gelu.default, (y,), {"approximate": a or "none"}),
              "swish": lambda y, s, a: (torch.ops.aten.silu.default, (y,), {}),
              "sigmoid": lambda y, s, a: (torch.ops.aten.sigmoid.default, (y,), {}),
              "tanh": lambda y, s, a: (torch.ops.aten.tanh.default, (y,), {}),
              "hardtanh": lambda y, s, a: (torch.ops.aten.hardtanh.default, (y, float(s[0]), float(s[1])), {})}


def rounds(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` rounds float values to integers: it holds an int8 kernel or a quantize step."""
    return any(n.op == "call_function" and (n.target in OUT_ARGS or n.target is quantize_u8) for n in gm.graph.nodes)


def as_qdq(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` in which every int8 kernel and quantize step is written as quantize/dequantize
    around the float op (``quantized_decomposed``'s Q/DQ form: the graph PyTorch's own int8 flow hands to
    Inductor), sharing ``gm``'s tensors; ``gm`` itself is not changed.

    Inductor with frozen weights rewrites that form back into oneDNN's int8 kernels, with what the
    eager operators cannot have: the weights prepacked at compile time, the activation, the next
    layer's quantize step and a residual add (with its ReLU) fused into one call, and the elementwise
    work around them in generated loops. It computes the same integers as the operators (the same
    oneDNN kernels, the same scales and zero points); where a float op sits between two of them, the
    value is quantized by ``round(x · (1/scale))`` (half to even), which can land one step away from
    :func:`quantize_u8`'s ``round(x / scale)`` when the two float32 products differ at a boundary. Graphs
    with no int8 kernel come back as they are."""
    import copy

    if not rounds(gm):
        return gm
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed

    qd = torch.ops.quantized_decomposed
    graph = copy.deepcopy(gm.graph)
    attrs: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("get_attr", "call_module"):
            attrs[n.target] = fetch_attr(gm, n.target)
    zeros: dict[int, str] = {}

    def zero_points(c: int) -> torch.fx.Node:
        if c not in zeros:
            zeros[c] = f"_int8_w_zero_points_{c}"
            attrs[zeros[c]] = torch.zeros(c, dtype=torch.int64, device="cpu")
        return graph.get_attr(zeros[c])

    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is quantize_u8:
            with graph.inserting_before(node):
                q = graph.call_function(qd.quantize_per_tensor.default,
                                        (node.args[0], float(node.args[1]), int(node.args[2]), 0, 255, torch.uint8))
        elif node.target is dequantize_u8:
            with graph.inserting_before(node):
                q = graph.call_function(qd.dequantize_per_tensor.default,
                                        (node.args[0], float(node.args[1]), int(node.args[2]), 0, 255, torch.uint8))
        elif node.target in OUT_ARGS:
            conv = node.target is CONV
            xq, x_scale, x_zp, qweight, w_scales, bias = node.args[:6]
            out_scale, out_zp, out_u8, attr, scalars, algo = node.args[10:] if conv else node.args[6:]
            c = fetch_attr(gm, qweight.target).shape[0] if qweight.op == "get_attr" else None
            if c is None:
                continue  # a computed weight: the operator stays as it is
            with graph.inserting_before(node):
                x = graph.call_function(qd.dequantize_per_tensor.default,
                                        (xq, float(x_scale), int(x_zp), 0, 255, torch.uint8))
                w = graph.call_function(qd.dequantize_per_channel.default,
                                        (qweight, w_scales, zero_points(c), 0, -128, 127, torch.int8))
                if conv:
                    stride, padding, dilation, groups = node.args[6:10]
                    y = graph.call_function(torch.ops.aten.convolution.default,
                                            (x, w, bias, list(stride), list(padding), list(dilation), False, [0, 0],
                                             int(groups)))
                else:
                    y = graph.call_function(torch.ops.aten.linear.default, (x, w, bias))
                if attr != "none":
                    target, args, kwargs = _POST_ATEN[attr](y, scalars, algo)
                    y = graph.call_function(target, args, kwargs)
                q = y if not out_u8 else graph.call_function(
                    qd.quantize_per_tensor.default, (y, float(out_scale), int(out_zp), 0, 255, torch.uint8))
        else:
            continue
        q.meta = dict(node.meta)
        node.replace_all_uses_with(q)
        graph.erase_node(node)
    graph.lint()
    return torch.fx.GraphModule(attrs, graph)


