"""fuse: merge linear algebra that can run as fewer, larger kernels. Exact up to float rounding.

- ``merge_linear_chain``: ``linear(linear(x; W1, b1); W2, b2) = linear(x; W2·W1, W2·b1 + b2)``
  when nothing non-linear is between them, the intermediate has no other user, and the merged
  layer costs fewer FLOPs (``in·out < in·mid + mid·out``).
- ``horizontal_linear``: linears reading the same input (Q, K, V projections, also of unequal
  widths as in grouped-query attention) become one linear with concatenated weights and a split
  of the last dimension.
- ``attention_to_sdpa``: ``softmax(Q·Kᵀ·s [+ mask]) · V`` becomes
  ``scaled_dot_product_attention(Q, K, V, mask, scale=s)``, matched by structure: s is the product of
  the scalar multiplies and divides on the scores, on Q and on Kᵀ (also through view/transpose); of an
  addition, the side that reaches Q·Kᵀ is the scores and the other side the mask (additive in the
  scores' dtype, or boolean through ``masked_fill``/``where`` with -inf or a fill ≤ -1e4). A mask
  added before a scale is scaled with it: ``(Q·Kᵀ + M)·s = Q·Kᵀ·s + M·s``. A scale computed from
  shapes (``x.shape[-1] ** -0.5`` under fx) stays a live expression, so the graph stays right for
  other input shapes. Never when an intermediate (scores, probabilities) is read elsewhere, a bool
  is added to the scores (that adds 0 or 1, it masks nothing), the softmax is not over the last dim,
  or Q and K have different batch dimensions.
- ``gelu_tanh``: GELU written out with pow/tanh (GPT-2's ``gelu_new``) becomes one ``gelu(x, "tanh")``.
- ``act_adjacent``: an activation is moved right behind the conv/linear it reads (when that is its
  only user), so a backend fusing conv+activation finds them together.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from optic import ir
from optic.ir import emit
from optic.ir.opview import Op, view
from optic.ir.rewrite import Rule, apply_rules
from optic.pipeline.registry import register


def merge_linears(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                  b2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One linear equal to ``linear(linear(x; w1, b1); w2, b2)`` (float64, cast back)."""
    w = w2.double() @ w1.double()
    b = None
    if b1 is not None:
        b = w2.double() @ b1.double()
    if b2 is not None:
        b = b2.double() if b is None else b + b2.double()
    return w.to(w2.dtype), None if b is None else b.to(w2.dtype)


def _gm(op: Op) -> fx.GraphModule:
    return op.node.graph.owning_module


def _const_linear(op: Op | None) -> bool:
    return op is not None and op.kind == "linear" and op.const("weight") is not None and "bias" in op.consts


# -- linear chains ---------------------------------------------------------------------------------
class MergeLinearChain(Rule):
    def match(self, op: Op, ctx: Any):
        if not _const_linear(op) or not isinstance(op.x, fx.Node):
            return None
        first = view(op.x, _gm(op))
        return (first, op) if _const_linear(first) else None

    def guard(self, m, ctx):
        first, second = m
        if len(ir.value_users(first.node)) > 1:
            return f"intermediate '{first.node.name}' has other users"
        w1, w2 = first.const("weight"), second.const("weight")
        readers = ir.tensor_readers(_gm(first))
        if ir.is_shared(_gm(first), w1, first.node, readers) or ir.is_shared(_gm(first), w2, second.node, readers):
            return "a weight is shared with another op (tied)"
        mid, inp, out = w1.shape[0], w1.shape[1], w2.shape[0]
        if inp * out >= inp * mid + mid * out:
            return f"merged {out}×{inp} weight costs more than {mid}×{inp} + {out}×{mid}"
        return None

    def apply(self, m, ctx):
        first, second = m
        graph, gm = second.node.graph, _gm(second)
        w, b = merge_linears(first.const("weight"), first.const("bias"), second.const("weight"), second.const("bias"))
        with graph.inserting_before(second.node):
            new = emit.linear(graph, first.x, emit.constant(graph, gm, w, "weight"), emit.constant(graph, gm, b, "bias"))
        ir.replace(second.node, new, "fuse", [first.node, second.node])


# -- horizontal fusion --------------------------------------------------------------------------------
@dataclass
class Siblings:
    x: fx.Node
    linears: list[Op] = field(default_factory=list)


class HorizontalLinear(Rule):
    def match(self, op: Op, ctx: Any):
        if not _const_linear(op) or not isinstance(op.x, fx.Node):
            return None
        gm = _gm(op)
        sibs = [v for u in ir.users_in_order(op.x) if (v := view(u, gm)) is not None and _const_linear(v) and v.x is op.x]
        if len(sibs) < 2 or sibs[0].node is not op.node:
            return None  # fire once per group, at its first member
        return Siblings(op.x, sibs)

    def guard(self, m: Siblings, ctx: Any):
        ws = [lin.const("weight") for lin in m.linears]
        if len({(w.shape[1], w.dtype) for w in ws}) != 1:
            return "siblings differ in input features or dtype"
        gm = m.x.graph.owning_module
        readers = ir.tensor_readers(gm)
        for lin in m.linears:
            if ir.is_shared(gm, lin.const("weight"), lin.node, readers):
                return f"weight of '{lin.node.name}' is shared with another op (tied)"
        return None

    def apply(self, m: Siblings, ctx: Any):
        graph, gm = m.x.graph, m.x.graph.owning_module
        ws = [lin.const("weight") for lin in m.linears]
        bs = [lin.const("bias") for lin in m.linears]
        w = torch.cat(ws, 0)
        b = None
        if any(x is not None for x in bs):
            b = torch.cat([x if x is not None else torch.zeros(wt.shape[0], dtype=wt.dtype, device=wt.device) for x, wt in zip(bs, ws, strict=True)])
        with graph.inserting_before(m.linears[0].node):
            fused = emit.linear(graph, m.x, emit.constant(graph, gm, w, "qkv_weight"), emit.constant(graph, gm, b, "qkv_bias"))
            ir.stamp(fused, [lin.node for lin in m.linears], "fuse")
            parts = emit.split_last(graph, fused, [wt.shape[0] for wt in ws])
        for lin, part in zip(m.linears, parts, strict=True):
            ir.replace(lin.node, part, "fuse")


# -- attention ------------------------------------------------------------------------------------------
# A scale is a product of factors ``value ** power`` (power +1 for a multiply, -1 for a divide). A value is
# a number, or a node that computes a Python number from tensor shapes (``x.shape[-1] // heads``): an fx
# graph is called later with other shapes, so such a factor stays a live expression, never a constant.
Factor = tuple[float | fx.Node, int]

_MASK_FILL_LIMIT = -1e4  # a fill value this negative gives exp(·) == 0 in every float dtype, like -inf
_MAX_SCORE_OPS = 8  # ops between Q·Kᵀ and softmax we look through (scales, a mask): real models use ≤ 4
_RELABELS = frozenset({"reshape", "flatten", "transpose", "permute", "contiguous", "unsqueeze", "squeeze"})
_SHAPE_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                               operator.pow, operator.neg, operator.getitem, math.sqrt})


@dataclass
class Mask:
    node: fx.Node
    kind: str  # "add": added to the scores; "keep" / "drop": boolean, the scores stay where True / False
    fill: float = 0.0  # for "keep" / "drop": the value the masked scores get


@dataclass
class Scores:
    """Softmax's input taken apart: ``Q·Kᵀ`` times scale factors, with at most one mask among them."""

    qk: fx.Node
    chain: list[fx.Node] = field(default_factory=list)  # the ops from Q·Kᵀ to softmax's input, replaced
    scale: list[Factor] = field(default_factory=list)
    mask: Mask | None = None
    mask_scale: list[Factor] = field(default_factory=list)  # the factors applied after the mask


@dataclass
class Scaled:
    """The scalar factors on one operand of Q·Kᵀ (``(q·s).view(…).transpose(…)`` has s), and the ops
    applying them, each with the value it scales: SDPA's scale takes them over."""

    scale: list[Factor] = field(default_factory=list)
    scalers: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)


@dataclass
class Attention:
    out: Op
    probs: Op
    scores: Scores | None = None
    q: Scaled = field(default_factory=Scaled)
    k: Scaled = field(default_factory=Scaled)
    reason: str | None = None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: Any, gm: fx.GraphModule) -> float | None:
    if _number(value):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "get_attr":
        t = ir.fetch_attr(gm, value.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.reshape(()))
    return None


def _shape_scalar(value: Any) -> bool:
    """Whether ``value`` is a node computing a Python number from tensor shapes alone
    (``x.shape[-1] // 4``, ``math.sqrt(q.size(-1))``): fx keeps these live."""
    if not isinstance(value, fx.Node) or ir.tensor_meta(value) is not None:
        return False
    if ir.is_shape_query(value):
        return True
    return (value.op == "call_function" and value.target in _SHAPE_ARITHMETIC and not value.kwargs
            and all(_shape_scalar(a) or _number(a) for a in value.args))


def _factor(op: Op, gm: fx.GraphModule) -> tuple[fx.Node, Factor] | None:
    """For ``a·s``, ``s·a`` or ``a/s`` with a tensor a and a scalar s: (a, the factor)."""
    def scalar(s: Any) -> float | fx.Node | None:
        return s if _shape_scalar(s) else _scalar(s, gm)

    if op.kind == "mul":
        for a, s in ((op.x, op.other), (op.other, op.x)):
            if ir.tensor_meta(a) is not None and (v := scalar(s)) is not None:
                return a, (v, 1)
    if op.kind == "div" and ir.tensor_meta(op.x) is not None and op.node.kwargs.get("rounding_mode") is None \
            and (v := scalar(op.other)) is not None:
        return op.x, (v, -1)
    return None


def _fill(op: Op, gm: fx.GraphModule) -> tuple[fx.Node, Mask] | str | None:
    """``scores.masked_fill(m, fill)``, ``where(keep, scores, fill)`` or ``where(drop, fill, scores)``:
    (scores, the mask); what is wrong with it; None for other ops."""
    if op.kind == "masked_fill":
        scores, fill, kind = op.x, op.other, "drop"
    elif op.kind == "where":
        scores, fill, kind = (op.x, op.other, "keep") if _scalar(op.other, gm) is not None else (op.other, op.x, "drop")
    else:
        return None
    value, cond = _scalar(fill, gm), op.attrs.get("mask")
    if value is None or not isinstance(cond, fx.Node) or not isinstance(scores, fx.Node):
        return f"'{op.node.name}' fills with something other than a number"
    return scores, Mask(cond, kind, value)


def _scores(node: Any, gm: fx.GraphModule, depth: int = 0) -> Scores | str:
    """``node`` as Q·Kᵀ times scale factors with at most one mask among them, by structure: of an
    addition, the side that reaches Q·Kᵀ is the scores and the other side is the mask. A string
    says what is in the way."""
    op = view(node, gm) if isinstance(node, fx.Node) else None
    if op is None:
        return f"found {getattr(node, 'name', node)!r}, which is no op known here"
    if depth > _MAX_SCORE_OPS:
        return f"more than {_MAX_SCORE_OPS} ops between softmax and a matmul"
    if op.kind == "matmul" and isinstance(op.x, fx.Node) and isinstance(op.other, fx.Node):
        return Scores(node)
    if (f := _factor(op, gm)) is not None:
        inner = _scores(f[0], gm, depth + 1)
        if isinstance(inner, Scores):
            inner.scale.append(f[1])
            if inner.mask is not None:
                inner.mask_scale.append(f[1])
            inner.chain.append(node)
        return inner
    if op.kind == "add" and op.attrs.get("alpha", 1) == 1:
        if not (isinstance(op.x, fx.Node) and isinstance(op.other, fx.Node)):
            return f"'{op.node.name}' adds a number, not a mask"
        tried = []
        for s, m in ((op.x, op.other), (op.other, op.x)):
            inner = _scores(s, gm, depth + 1)
            if isinstance(inner, Scores):
                return _masked(inner, Mask(m, "add"), node)
            tried.append(inner)
        return f"neither side of '{op.node.name}' reaches Q·Kᵀ ({tried[0]})"
    filled = _fill(op, gm)
    if filled is None:
        return f"found a {op.kind} ('{op.node.name}')"
    if isinstance(filled, str):
        return filled
    inner = _scores(filled[0], gm, depth + 1)
    return _masked(inner, filled[1], node) if isinstance(inner, Scores) else inner


def _masked(inner: Scores, mask: Mask, node: fx.Node) -> Scores | str:
    if inner.mask is not None:
        return f"two masks ('{inner.mask.node.name}' and '{mask.node.name}')"
    inner.mask = mask
    inner.chain.append(node)
    return inner


def _scaled_operand(node: Any, gm: fx.GraphModule) -> Scaled:
    """The scalar factors on an operand of Q·Kᵀ, looking through ops that only move elements (view,
    transpose, ...); stops at a value that something else reads too (its scale must stay)."""
    found = Scaled()
    while isinstance(node, fx.Node) and len(ir.value_users(node)) == 1 and (op := view(node, gm)) is not None:
        if (f := _factor(op, gm)) is not None:
            found.scale.append(f[1])
            found.scalers.append((node, f[0]))
            node = f[0]
        elif op.kind in _RELABELS and isinstance(op.x, fx.Node):
            node = op.x
        else:
            break
    return found


class AttentionToSdpa(Rule):
    def match(self, op: Op, ctx: Any):
        if op.kind != "matmul" or not isinstance(op.x, fx.Node):
            return None
        gm = _gm(op)
        probs = view(op.x, gm)
        if probs is None or probs.kind != "softmax" or not isinstance(probs.x, fx.Node):
            return None
        scores = _scores(probs.x, gm)
        if isinstance(scores, str):
            return Attention(op, probs, reason=f"softmax input is not (Q·Kᵀ)·scale [+ mask]: {scores}")
        qk = view(scores.qk, gm)
        return Attention(op, probs, scores, _scaled_operand(qk.x, gm), _scaled_operand(qk.other, gm))

    def guard(self, m: Attention, ctx: Any):
        if m.reason:
            return m.reason
        gm = _gm(m.out)
        qk = view(m.scores.qk, gm)
        return (_reuse_reason(m) or _softmax_reason(m.probs) or _operands_reason(qk.x, qk.other, m.out.other)
                or _scores_reason(m) or _mask_reason(m.scores, ir.dtype(qk.x)))

    def apply(self, m: Attention, ctx: Any):
        graph, gm = m.out.node.graph, _gm(m.out)
        for scaler, scaled in m.q.scalers + m.k.scalers:
            scaler.replace_all_uses_with(scaled)  # SDPA's scale takes the factor over
        qk = view(m.scores.qk, gm)
        with graph.inserting_before(m.out.node):
            scale = _product(graph, m.scores.scale + m.q.scale + m.k.scale)
            new = emit.sdpa(graph, qk.x, _untransposed(qk.other, gm), m.out.other, _sdpa_mask(m.scores, gm), scale)
        absorbed = [n for n, _ in m.q.scalers + m.k.scalers]
        ir.replace(m.out.node, new, "fuse", [m.out.node, m.probs.node, *m.scores.chain, m.scores.qk, *absorbed])


def _reuse_reason(m: Attention) -> str | None:
    for n in (m.probs.node, *m.scores.chain, m.scores.qk):
        if len(ir.value_users(n)) > 1:
            return f"intermediate '{n.name}' is also used elsewhere"
    return None


def _softmax_reason(probs: Op) -> str | None:
    rank = len(ir.shape(probs.node) or ())
    dim = probs.attrs.get("dim")
    if rank == 0 or dim is None or dim not in (-1, rank - 1):
        return f"softmax over dim {dim}, not the last"
    if probs.attrs.get("dtype") not in (None, ir.dtype(probs.x)) or probs.attrs.get("half_to_float"):
        return "softmax changes dtype"
    return None


def _operands_reason(q: fx.Node, kt: fx.Node, v: Any) -> str | None:
    """Why Q, Kᵀ and V are not what SDPA takes (batched, same batch dims, a float dtype)."""
    qs, ks, vs = ir.shape(q), ir.shape(kt), ir.shape(v)
    if qs is None or ks is None or vs is None or min(len(qs), len(ks), len(vs)) < 3:
        return "Q, K, V need batch dimensions (rank ≥ 3)"
    if not (qs[:-2] == ks[:-2] == vs[:-2]):
        return f"batch dimensions differ: Q{qs} Kᵀ{ks} V{vs}"
    if ks[-2] != qs[-1] or vs[-2] != ks[-1]:
        return "shapes are not Q·Kᵀ·V"
    dt = ir.dtype(q)
    if dt not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"dtype {dt}"
    return None


def _scores_reason(m: Attention) -> str | None:
    """Why the ops from Q·Kᵀ to softmax are not a scale (and mask) of the scores."""
    s = m.scores
    for n in s.chain:
        if ir.shape(n) != ir.shape(s.qk) or ir.dtype(n) != ir.dtype(s.qk):
            return f"'{n.name}' turns the {ir.dtype(s.qk)} scores {ir.shape(s.qk)} into {ir.dtype(n)} {ir.shape(n)}"
    if any(isinstance(v, float) and v == 0 and p == -1 for v, p in s.scale + m.q.scale + m.k.scale):
        return "the scores are divided by zero"
    return None


def _mask_reason(s: Scores, dt: torch.dtype) -> str | None:
    mask = s.mask
    if mask is None:
        return None
    if mask.kind == "add":
        if ir.dtype(mask.node) != dt:
            return f"additive mask '{mask.node.name}' is {ir.dtype(mask.node)}, not {dt} like the scores"
        return None
    if ir.dtype(mask.node) != torch.bool:
        return f"mask '{mask.node.name}' is {ir.dtype(mask.node)}, not bool"
    fill = mask.fill
    for v, p in s.mask_scale:
        if not isinstance(v, fx.Node):
            fill = fill * v if p == 1 else fill / v
    # -inf stays -inf under every positive scale (and under a scale ≤ 0 the original itself is NaN
    # wherever it masks); a finite fill under a scale that depends on the input shape may not stay low
    if fill != float("-inf") and any(isinstance(v, fx.Node) for v, _ in s.mask_scale):
        return f"the scores are masked with {mask.fill:g}, not -inf, before a scale that depends on the input shape"
    if not fill <= _MASK_FILL_LIMIT:
        return f"masked scores become {fill:g}, not -inf (nor below {_MASK_FILL_LIMIT:g})"
    return None


def _product(graph: fx.Graph, factors: list[Factor]) -> float | fx.Node:
    """The product of ``factors``: a number, or where a factor depends on shapes, Python arithmetic
    in the graph (evaluated on every call, so right for every input shape)."""
    number, live = 1.0, []
    for v, p in factors:
        if isinstance(v, fx.Node):
            live.append((v, p))
        else:
            number = number * v if p == 1 else number / v
    out: float | fx.Node = number
    for v, p in live:
        out = graph.call_function(operator.mul if p == 1 else operator.truediv, (out, v))
    return out


def _sdpa_mask(s: Scores, gm: fx.GraphModule) -> fx.Node | None:
    """SDPA's ``attn_mask``: additive (scaled by the factors applied after it), or boolean, True = attend."""
    graph, mask = s.qk.graph, s.mask
    if mask is None or mask.kind == "keep":
        return None if mask is None else mask.node
    if mask.kind == "add":
        if not s.mask_scale:
            return mask.node
        return graph.call_function(torch.ops.aten.mul.Tensor, (mask.node, _product(graph, s.mask_scale)))
    const = ir.fetch_attr(gm, mask.node.target) if mask.node.op == "get_attr" else None
    if isinstance(const, torch.Tensor):
        return ir.const_node(graph, gm, ~const, "keep_mask")
    negated = _negation_of(mask.node)
    if negated is not None:  # masked_fill(~keep, -inf): SDPA takes ``keep`` itself
        return negated
    return graph.call_function(torch.ops.aten.logical_not.default, (mask.node,))


_NEGATIONS = (torch.ops.aten.bitwise_not.default, torch.ops.aten.logical_not.default, torch.bitwise_not,
              torch.logical_not, operator.invert)


def _negation_of(node: fx.Node) -> fx.Node | None:
    """``x`` when ``node`` is ``~x`` (or ``logical_not(x)``) of a bool tensor ``x``, else None."""
    negation = (node.op == "call_function" and node.target in _NEGATIONS) or (
        node.op == "call_method" and node.target in ("bitwise_not", "logical_not", "__invert__"))
    x = node.args[0] if negation and node.args else None
    return x if isinstance(x, fx.Node) and ir.dtype(x) == torch.bool else None


def _untransposed(kt: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """K for a Kᵀ: the input of a transpose of the last two dims, else a new transpose."""
    op = view(kt, gm)
    rank = len(ir.shape(kt))
    if op is not None and op.kind == "transpose" and len(kt.users) == 1 and \
            sorted(d % rank for d in (op.attrs["dim0"], op.attrs["dim1"])) == [rank - 2, rank - 1]:
        return op.x
    return emit.transpose_last(kt.graph, kt)


# -- GELU written out ------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = (2 / 3.141592653589793) ** 0.5


def _with_scalar(node: Any, kind: str, gm: fx.GraphModule) -> tuple[fx.Node, float] | None:
    """For ``node = a ∘ c`` (∘ = kind, c a scalar, either order): (a, c)."""
    op = view(node, gm) if isinstance(node, fx.Node) else None
    if op is None or op.kind != kind:
        return None
    for a, c in ((op.x, op.other), (op.other, op.x)):
        if isinstance(a, fx.Node) and (v := _scalar(c, gm)) is not None and _scalar(a, gm) is None:
            return a, v
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


class GeluTanh(Rule):
    """``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` (GPT-2's ``gelu_new``) → ``gelu(x, 'tanh')``."""

    def match(self, op: Op, ctx: Any):
        if op.kind != "mul" or not isinstance(op.x, fx.Node) or not isinstance(op.other, fx.Node):
            return None
        gm = _gm(op)
        for half, rest in ((op.x, op.other), (op.other, op.x)):
            h = _with_scalar(half, "mul", gm)
            one = _with_scalar(rest, "add", gm)
            if h is None or one is None or not _close(h[1], 0.5) or not _close(one[1], 1.0):
                continue
            x = h[0]
            t = view(one[0], gm)
            if t is None or t.kind != "act" or t.attrs.get("fn") != "tanh":
                continue
            u = _with_scalar(t.x, "mul", gm)
            if u is None or not _close(u[1], _SQRT_2_OVER_PI):
                continue
            inner = view(u[0], gm)
            if inner is None or inner.kind != "add":
                continue
            cube = inner.other if inner.x is x else inner.x if inner.other is x else None
            w = _with_scalar(cube, "mul", gm)
            if w is None or not _close(w[1], 0.044715):
                continue
            p = view(w[0], gm)
            if p is None or p.kind != "pow" or p.x is not x or _scalar(p.other, gm) != 3.0:
                continue
            chain = [half, rest, one[0], t.x, u[0], cube, w[0]]
            return op, x, chain
        return None

    def guard(self, m, ctx):
        _, _, chain = m
        for n in chain:
            if len(ir.value_users(n)) > 1:
                return f"intermediate '{n.name}' is also used elsewhere"
        return None

    def apply(self, m, ctx):
        op, x, chain = m
        graph = op.node.graph
        with graph.inserting_before(op.node):
            new = emit.activation(graph, x, "gelu", {"approximate": "tanh"})
        ir.replace(op.node, new, "fuse", [op.node, *chain])


# -- activations next to their producer --------------------------------------------------------------------
class ActAdjacent(Rule):
    def match(self, op: Op, ctx: Any):
        if op.kind != "act" or not isinstance(op.x, fx.Node) or op.node.prev is op.x:
            return None
        prod = view(op.x, _gm(op))
        if prod is None or prod.kind not in ("conv", "linear") or len(op.x.users) != 1:
            return None
        return op

    def guard(self, op: Op, ctx: Any):
        order = {n: i for i, n in enumerate(op.node.graph.nodes)}
        if any(order[a] > order[op.x] for a in op.node.all_input_nodes if a is not op.x):
            return "activation reads a value defined after its producer"
        if ir.is_inplace(op.node):
            return "in-place activation"
        return None

    def apply(self, op: Op, ctx: Any):
        op.x.append(op.node)


@register
class Fuse:
    name = "fuse"
    exact = True
    description = "merge linear chains, horizontal linear fusion (QKV), attention to SDPA, conv/linear+act adjacency"
    options = ()
    rules = (AttentionToSdpa("attention_to_sdpa"), GeluTanh("gelu_tanh"), MergeLinearChain("merge_linear_chain"),
             HorizontalLinear("horizontal_linear"), ActAdjacent("act_adjacent"))

    def run(self, program, ctx) -> bool:
        return apply_rules(program.gm, list(self.rules), ctx, ctx.stats)

