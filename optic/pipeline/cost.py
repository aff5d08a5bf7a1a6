"""Cost: FLOPs and bytes per node, and a roofline latency estimate per target.

Counts come from the op view and the shapes recorded at capture. Shapes are plain integers for
static graphs; a shape entry may also be a sympy expression (e.g. ``B`` for a symbolic batch), and
every count below is then a sympy expression in it: :func:`symbolic_batch_flops` gives the FLOPs
of a Program as a polynomial in the batch size. Conventions: a multiply-add is 2 FLOPs (a bias
adds nothing: it starts the accumulator); elementwise ops count one FLOP per output element,
activations the operations of their formula (:func:`activation_flops`); normalizations and softmax
about five.

A count is the arithmetic, whatever runs it: the same conv costs the same FLOPs as ``aten.convolution``,
as oneDNN's fused ``mkldnn._convolution_pointwise`` (its weight prepacked into an opaque blocked
tensor, which still reports its logical sizes) and as a generated kernel, so that a pass changes
the report's FLOPs only where it changes what is computed (``tests/pipeline/test_flops_invariance.py``).
The fused kernels are counted here rather than in the op view on purpose: no pass may match them
as a conv or a linear (their weights are not plain tensors). A module the view does not know
counts through its ``flops(out_shape)`` method when it has one (optic's kernel modules do, with
:func:`kernel_flops`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from ..ir.graph import dtype, fetch_attr, shape, tensor_meta
from ..ir.opview import ELEMENTWISE_KINDS, SHAPE_KINDS, view

BATCH = sympy.Symbol("B", positive=True, integer=True)

_PER_ELEMENT = {"batch_norm": 2, "layer_norm": 5, "rms_norm": 4, "group_norm": 5, "softmax": 5, "mean": 1}

# Activations whose formula is more than one operation (each transcendental, tanh, erf, exp,
# sigmoid, counts one). A fused spelling costs what the written-out one does: GPT-2's
# 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) is 8 operations, so fuse's gelu_tanh keeps the count.
_ACT_FLOPS = {("gelu", "tanh"): 8, ("gelu", "none"): 5, "silu": 2, "hardswish": 4, "hardsigmoid": 3,
              "mish": 4, "elu": 3}
# oneDNN's names for the activations it fuses (cpu_tactics) -> the op view's
_ONEDNN_ACTS = {"swish": "silu"}


def activation_flops(fn: str | None, approximate: str | None = None) -> int:
    """FLOPs per element of activation ``fn`` (an op-view name, or oneDNN's; None or "none": 0)."""
    if fn in (None, "none", ""):
        return 0
    fn = _ONEDNN_ACTS.get(fn, fn)
    if fn == "gelu":
        return _ACT_FLOPS["gelu", approximate if approximate == "tanh" else "none"]
    return _ACT_FLOPS.get(fn, 1)


def kernel_flops(out_shape: tuple, weight_shape: tuple, epilogue: Iterable[str] = ()) -> Any:
    """FLOPs of a conv or linear (any kernel: ATen, oneDNN, generated) with a fused epilogue.

    ``weight_shape`` is the logical weight, output channels first (``(C_out, C_in/groups, k…)`` for
    a conv, ``(out, in)`` for a linear): each output element takes one multiply-add per weight
    element of its channel. ``epilogue``: what runs on each output element after it, by name:
    ``"bias"`` (free), ``"residual"`` or ``"add"`` (one), an activation (:func:`activation_flops`).
    """
    out = _numel(out_shape)
    per_element = sum(0 if e == "bias" else 1 if e in ("residual", "add") else activation_flops(e) for e in epilogue)
    return 2 * out * _numel(tuple(weight_shape[1:])) + out * per_element


@dataclass
class NodeCost:
    flops: Any  # int or sympy expression
    bytes: Any
    dtype: str


def _numel(s: tuple | None) -> Any:
    return 0 if s is None else math.prod(s) if s else 1


def _bytes(node: Any, dims: tuple | None = None) -> Any:
    tm = tensor_meta(node)
    if tm is None:
        return 0
    dims = dims if dims is not None else shape(node)
    return _numel(dims) * tm.dtype.itemsize


def _tensor_bytes(t: Any) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


# -- fused kernels outside the op view: target -> FLOPs(arguments by name, output shape, shape of a value)
def _logical_shape(value: Any, gm: fx.GraphModule, shape_of: Callable) -> tuple | None:
    """Sizes of a weight: the constant's own (a oneDNN blocked tensor reports its logical sizes), else
    the recorded shape of the value."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        t = fetch_attr(gm, value.target)
        if isinstance(t, torch.Tensor):
            return tuple(t.shape)
    return shape_of(value)


def _onednn(binary: str | None, act: str | None, algorithm: str | None) -> Callable:
    """FLOPs of a oneDNN conv/linear: the contraction, a fused binary op (the residual add), the activation."""

    def flops(a: dict, out: tuple, gm: fx.GraphModule, shape_of: Callable) -> Any:
        w = _logical_shape(a.get("W"), gm, shape_of)
        if w is None:
            return 0
        epilogue = ["add"] if binary and a.get(binary) not in (None, "none") else []
        fused = activation_flops(a.get(act), a.get(algorithm)) if act else 0
        return kernel_flops(out, w, epilogue) + _numel(out) * fused
    return flops


def _addcmul(a: dict, out: tuple, gm: fx.GraphModule, shape_of: Callable) -> Any:
    return 2 * _numel(out)  # x + t1·t2 (fold_norm's per-channel scale and shift)


_KERNELS: dict[Any, Callable] = {}
for _target, _flops in (
        ("mkldnn::_convolution_pointwise", _onednn(None, "attr", "algorithm")),
        ("mkldnn::_convolution_pointwise.binary", _onednn("binary_attr", "unary_attr", "unary_algorithm")),
        ("mkldnn::_linear_pointwise", _onednn(None, "attr", "algorithm")),
        ("mkldnn::_linear_pointwise.binary", _onednn("attr", None, None)),
        ("aten::addcmul", _addcmul)):
    _KERNELS[_target] = _flops


def _schema(target: Any) -> Any:
    if isinstance(target, torch._ops.OpOverloadPacket):
        target = getattr(target, "default", None)
    return getattr(target, "_schema", None)


def _kernel_flops(node: fx.Node, gm: fx.GraphModule, out: tuple, shape_of: Callable) -> Any | None:
    """FLOPs of a node the op view does not classify, when it is a kernel optic's passes emit; else None."""
    if node.op == "call_module":
        count = getattr(gm.get_submodule(node.target), "flops", None)
        return count(out) if callable(count) else None
    schema = _schema(node.target) if node.op == "call_function" else None
    if schema is None:
        return None
    fn = _KERNELS.get(schema.name + ("" if schema.overload_name in ("", "default") else f".{schema.overload_name}"))
    if fn is None:
        return None
    args = dict(zip((a.name for a in schema.arguments), node.args, strict=False)) | dict(node.kwargs)
    return fn(args, out, gm, shape_of)


def _read_bytes(node: fx.Node, gm: fx.GraphModule, shape_of: Callable) -> Any:
    """Bytes of the values a node reads: its tensor inputs, and the tensors a called module holds."""
    moved = sum(_bytes(a, shape_of(a)) for a in node.all_input_nodes if tensor_meta(a) is not None)
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        moved += sum(_tensor_bytes(t) for t in (*mod.parameters(), *mod.buffers()))
    return moved


def node_cost(node: fx.Node, gm: fx.GraphModule, shape_of=shape) -> NodeCost | None:
    """FLOPs and bytes moved by one node (None for nodes that compute nothing, and for ops unknown here)."""
    out = shape_of(node)
    dt = str(dtype(node) or "")
    if out is None or node.op not in ("call_function", "call_method", "call_module"):
        return None
    op = view(node, gm)
    if op is None:
        flops = _kernel_flops(node, gm, out, shape_of)
        if flops is None:
            return None
        if node.op == "call_module":  # a kernel computing in another precision than its output's (int8 → float32)
            dt = str(getattr(gm.get_submodule(node.target), "compute_dtype", dt))
        return NodeCost(flops, _read_bytes(node, gm, shape_of) + _bytes(node, out), dt)
    if op.kind in SHAPE_KINDS or op.kind in ("dropout", "identity"):
        return NodeCost(0, 0, dt)
    moved = _read_bytes(node, gm, shape_of) + _bytes(node, out)
    if op.kind == "conv":
        w = op.const("weight")
        wshape = tuple(w.shape) if w is not None else shape_of(op.attrs.get("weight_node"))
        if wshape is None:
            return NodeCost(0, moved, dt)
        if op.attrs.get("transposed"):
            # each input element scatters into C_out/groups · kernel outputs (weight is (C_in, C_out/groups, k…))
            flops = 2 * _numel(shape_of(op.x)) * _numel(wshape[1:])
        else:
            flops = kernel_flops(out, wshape)
        return NodeCost(flops, moved, dt)
    if op.kind == "linear":
        w = op.const("weight")
        k = w.shape[1] if w is not None else (shape_of(op.x) or (1,))[-1]
        return NodeCost(2 * _numel(out) * k, moved, dt)
    if op.kind == "matmul":
        a = shape_of(op.x)
        k = a[-1] if a else 1
        return NodeCost(2 * _numel(out) * k, moved, dt)
    if op.kind == "sdpa":
        q = shape_of(op.x)
        ks, vs = (shape_of(n) for n in op.other) if op.other else (None, None)
        if q is None or ks is None or vs is None:
            return NodeCost(0, moved, dt)
        # Q·Kᵀ, the scale (on Q or on the scores, whichever is smaller: kernels do either), the mask on the
        # scores, softmax over them, P·V
        scores = _numel(q[:-1]) * ks[-2]
        scale = sympy.Min(scores, _numel(q))
        scale = int(scale) if scale.is_number else scale
        masked = op.attrs.get("attn_mask") is not None or bool(op.attrs.get("is_causal"))
        return NodeCost(2 * scores * q[-1] + scale + (int(masked) + 5) * scores + 2 * scores * vs[-1], moved, dt)
    if op.kind in _PER_ELEMENT:
        return NodeCost(_PER_ELEMENT[op.kind] * _numel(shape_of(op.x) or out), moved, dt)
    if op.kind == "act":
        return NodeCost(activation_flops(op.attrs.get("fn"), op.attrs.get("approximate")) * _numel(out), moved, dt)
    if op.kind in ELEMENTWISE_KINDS:
        return NodeCost(_numel(out), moved, dt)
    return NodeCost(_numel(out), moved, dt)


def walk(gm: fx.GraphModule):
    """``(node, graph module)`` for every node, inside a module that runs a graph of its own too (the
    backend's compiled whole graph exposes it as ``graph_module``): what runs is what its graph holds."""
    for n in gm.graph.nodes:
        inner = getattr(gm.get_submodule(n.target), "graph_module", None) if n.op == "call_module" else None
        if isinstance(inner, fx.GraphModule):
            yield from walk(inner)
        else:
            yield n, gm


def total_flops(program) -> Any:
    return sum((c.flops for n, gm in walk(program.gm) if (c := node_cost(n, gm)) is not None), 0)


def symbolic_batch_flops(program) -> sympy.Expr:
    """FLOPs as a polynomial in the batch size ``B``.

    Leading dimensions equal to the example batch are taken to be the batch; reshapes that fold
    the batch into another dimension (``B·L``) are recognised by divisibility. The result is exact
    when the model's work scales with the batch the way its shapes say (every model whose batch
    dimension is independent); it is the static count at ``B = example batch``.
    """
    batch = _example_batch(program)
    if batch is None:
        return sympy.Integer(int(total_flops(program)))

    def shape_of(node: Any) -> tuple | None:
        s = shape(node)
        if not s:
            return s
        lead = s[0]
        if lead == batch:
            return (BATCH, *s[1:])
        if batch > 1 and lead % batch == 0:
            return (BATCH * (lead // batch), *s[1:])
        return s

    return sympy.expand(sum((c.flops for n, gm in walk(program.gm) if (c := node_cost(n, gm, shape_of)) is not None),
                            sympy.Integer(0)))


def _example_batch(program) -> int | None:
    for t in program.flat_inputs():
        if hasattr(t, "shape") and len(t.shape) > 0:
            return int(t.shape[0])
    return None


def kernel_seconds(flops: float, nbytes: float, target, dtype: str = "float32") -> float:
    """Roofline time of one kernel on ``target``: max(FLOPs / peak, bytes / bandwidth) plus a launch
    overhead (4 µs on a GPU, 1 µs on a CPU)."""
    dt = str(dtype).replace("torch.", "") or "float32"
    peak = target.peak_flops(dt if dt in ("float16", "bfloat16", "int8") else "float32") or target.peak_flops("float32")
    launch = 4e-6 if target.kind == "gpu" else 1e-6
    return max(float(flops) / peak, float(nbytes) / target.mem_bandwidth) + launch


def node_seconds(node: fx.Node, gm: fx.GraphModule, target) -> float:
    """Roofline time of one node on ``target`` (0 for nodes that compute nothing)."""
    c = node_cost(node, gm)
    if c is None or (c.flops == 0 and c.bytes == 0):
        return 0.0
    return kernel_seconds(c.flops, c.bytes, target, c.dtype)


def roofline_seconds(program, target) -> float:
    """Sum over nodes of max(FLOPs / peak, bytes / bandwidth) plus a per-kernel launch overhead."""
    return sum(node_seconds(n, gm, target) for n, gm in walk(program.gm))
