"""Cost: FLOPs and bytes per node, and a roofline latency estimate per target.

Counts come from the op view and the shapes recorded at capture. Shapes are plain integers for
static graphs; a shape entry may also be a sympy expression (e.g. ``B`` for a symbolic batch), and
every count below is then a sympy expression in it: :func:`symbolic_batch_flops` gives the FLOPs
of a Program as a polynomial in the batch size. Conventions: a multiply-add is 2 FLOPs;
elementwise ops count one FLOP per output element; normalizations and softmax about five.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import sympy
import torch.fx as fx

from .ir import dtype, shape, tensor_meta
from .opview import ELEMENTWISE_KINDS, SHAPE_KINDS, view

BATCH = sympy.Symbol("B", positive=True, integer=True)

_PER_ELEMENT = {"batch_norm": 2, "layer_norm": 5, "rms_norm": 4, "group_norm": 5, "softmax": 5, "mean": 1}


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


def node_cost(node: fx.Node, gm: fx.GraphModule, shape_of=shape) -> NodeCost | None:
    """FLOPs and bytes moved by one node (None for nodes that compute nothing)."""
    op = view(node, gm)
    out = shape_of(node)
    dt = str(dtype(node) or "")
    if op is None or out is None:
        return None
    if op.kind in SHAPE_KINDS or op.kind in ("dropout", "identity"):
        return NodeCost(0, 0, dt)
    inputs = [a for a in node.all_input_nodes if tensor_meta(a) is not None]
    moved = sum(_bytes(a, shape_of(a)) for a in inputs) + _bytes(node, out)
    if op.kind == "conv":
        w = op.const("weight")
        wshape = tuple(w.shape) if w is not None else shape_of(op.attrs.get("weight_node"))
        if wshape is None:
            return NodeCost(0, moved, dt)
        groups = op.attrs.get("groups", 1)
        kernel = math.prod(wshape[2:])
        if op.attrs.get("transposed"):
            # each input element scatters into C_out/groups · kernel outputs
            xs = shape_of(op.x)
            flops = 2 * _numel(xs) * wshape[1] * kernel
        else:
            flops = 2 * _numel(out) * wshape[1] * kernel  # weight is (C_out, C_in/groups, k...)
        del groups
        moved += w.numel() * w.element_size() if w is not None else 0
        return NodeCost(flops, moved, dt)
    if op.kind == "linear":
        w = op.const("weight")
        k = w.shape[1] if w is not None else (shape_of(op.x) or (1,))[-1]
        moved += w.numel() * w.element_size() if w is not None else 0
        return NodeCost(2 * _numel(out) * k, moved, dt)
    if op.kind == "matmul":
        a = shape_of(op.x)
        k = a[-1] if a else 1
        return NodeCost(2 * _numel(out) * k, moved, dt)
    if op.kind == "sdpa":
        q = shape_of(op.x)
        k_node = op.other[0] if op.other else None
        ks = shape_of(k_node)
        if q is None or ks is None:
            return NodeCost(0, moved, dt)
        # Q·Kᵀ and P·V, plus softmax over the scores
        scores = _numel(q[:-1]) * ks[-2]
        return NodeCost(4 * scores * q[-1] + 5 * scores, moved, dt)
    if op.kind in _PER_ELEMENT:
        return NodeCost(_PER_ELEMENT[op.kind] * _numel(shape_of(op.x) or out), moved, dt)
    if op.kind in ELEMENTWISE_KINDS:
        return NodeCost(_numel(out), moved, dt)
    return NodeCost(_numel(out), moved, dt)


def total_flops(program) -> Any:
    gm = program.gm
    return sum((c.flops for n in gm.graph.nodes if (c := node_cost(n, gm)) is not None), 0)


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

    gm = program.gm
    return sympy.expand(sum((c.flops for n in gm.graph.nodes if (c := node_cost(n, gm, shape_of)) is not None),
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
    peak = target.peak_flops(dt if dt in ("float16", "bfloat16") else "float32") or target.peak_flops("float32")
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
    gm = program.gm
    return sum(node_seconds(n, gm, target) for n in gm.graph.nodes)
