"""fuse: merge linear algebra that can run as fewer, larger kernels. Exact up to float rounding.

- ``merge_linear_chain``: ``linear(linear(x; W1, b1); W2, b2) = linear(x; W2·W1, W2·b1 + b2)``
  when nothing non-linear is between them, the intermediate has no other user, and the merged
  layer costs fewer FLOPs (``in·out < in·mid + mid·out``).
- ``horizontal_linear``: linears reading the same input (Q, K, V projections, also of unequal
  widths as in grouped-query attention) become one linear with concatenated weights and a split
  of the last dimension.
- ``attention_to_sdpa``: ``softmax(Q·Kᵀ·s [+ mask]) · V`` (scale as a multiply or a divide, on the
  scores or on Q) becomes ``scaled_dot_product_attention(Q, K, V, mask, scale=s)``. Never when an
  intermediate (scores, probabilities) is read elsewhere, the softmax is not over the last dim,
  or Q and K have different batch dimensions.
- ``gelu_tanh``: GELU written out with pow/tanh (GPT-2's ``gelu_new``) becomes one ``gelu(x, "tanh")``.
- ``act_adjacent``: an activation is moved right behind the conv/linear it reads (when that is its
  only user), so a backend fusing conv+activation finds them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from optic import emit, ir
from optic.opview import Op, view
from optic.registry import register
from optic.rewrite import Rule, apply_rules


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
            b = torch.cat([x if x is not None else torch.zeros(wt.shape[0], dtype=wt.dtype) for x, wt in zip(bs, ws, strict=True)])
        with graph.inserting_before(m.linears[0].node):
            fused = emit.linear(graph, m.x, emit.constant(graph, gm, w, "qkv_weight"), emit.constant(graph, gm, b, "qkv_bias"))
            ir.stamp(fused, [lin.node for lin in m.linears], "fuse")
            parts = emit.split_last(graph, fused, [wt.shape[0] for wt in ws])
        for lin, part in zip(m.linears, parts, strict=True):
            ir.replace(lin.node, part, "fuse")


# -- attention ------------------------------------------------------------------------------------------
@dataclass
class Attention:
    out: Op
    q: fx.Node
    kt: fx.Node
    v: fx.Node
    mask: Any
    scale: float
    chain: list[fx.Node]
    reason: str | None = None


def _scalar(value: Any, gm: fx.GraphModule) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, fx.Node) and value.op == "get_attr":
        t = ir.fetch_attr(gm, value.target)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.reshape(()))
    return None


def _scaled(op: Op, gm: fx.GraphModule) -> tuple[fx.Node, float] | None:
    """For ``a·s``, ``s·a`` or ``a/s`` with a scalar s: (a, s)."""
    if op.kind == "mul":
        for a, s in ((op.x, op.other), (op.other, op.x)):
            if isinstance(a, fx.Node) and (v := _scalar(s, gm)) is not None and not _scalar(a, gm):
                return a, v
    if op.kind == "div" and isinstance(op.x, fx.Node) and (v := _scalar(op.other, gm)):
        return op.x, 1.0 / v
    return None


_MASK_FILL_LIMIT = -1e4  # a fill value this negative gives exp(·) == 0 in every float dtype, like -inf


class AttentionToSdpa(Rule):
    def match(self, op: Op, ctx: Any):
        if op.kind != "matmul" or not isinstance(op.x, fx.Node):
            return None
        gm = _gm(op)
        probs = view(op.x, gm)
        if probs is None or probs.kind != "softmax" or not isinstance(probs.x, fx.Node):
            return None
        chain = [probs.node]
        node, mask, scale = probs.x, None, 1.0
        cur = view(node, gm)
        masked = self._mask(cur, gm)
        if masked is not None:
            chain.append(cur.node)
            node, mask = masked
            cur = view(node, gm) if isinstance(node, fx.Node) else None
        scaled = _scaled(cur, gm) if cur is not None else None
        if scaled is not None:
            chain.append(cur.node)
            node, scale = scaled
            cur = view(node, gm)
        if cur is None or cur.kind != "matmul" or not isinstance(cur.x, fx.Node) or not isinstance(cur.other, fx.Node):
            found = "nothing known" if cur is None else f"a {cur.kind} ('{cur.node.name}')"
            return Attention(op, None, None, op.other, None, 0.0, chain,
                             f"softmax input is not (Q·Kᵀ)·scale [+ mask]: found {found}")
        chain.append(cur.node)
        q = cur.x
        qv = view(q, gm)
        if qv is not None and (qs := _scaled(qv, gm)) is not None and len(ir.value_users(q)) == 1:
            chain.append(q)
            q, scale = qs[0], scale * qs[1]
        m = Attention(op, q, cur.other, op.other, mask, scale, chain)
        m.reason = self._why_not(m, probs, gm)
        return m

    @staticmethod
    def _mask(cur: Op | None, gm: fx.GraphModule) -> tuple[fx.Node, Any] | None:
        """(scores, SDPA mask) for ``scores + mask``, ``scores.masked_fill(m, -inf)``, ``where(keep, scores, -inf)``."""
        if cur is None:
            return None
        if cur.kind == "add":
            for s_, m_ in ((cur.x, cur.other), (cur.other, cur.x)):
                sv = view(s_, gm) if isinstance(s_, fx.Node) else None
                if sv is not None and (sv.kind == "matmul" or _scaled(sv, gm)) and isinstance(m_, fx.Node):
                    return s_, m_
        fill = _scalar(cur.other, gm) if cur.kind in ("masked_fill", "where") else None
        if fill is None or fill > _MASK_FILL_LIMIT or not isinstance(cur.attrs.get("mask"), fx.Node):
            return None
        if ir.dtype(cur.attrs["mask"]) != torch.bool:
            return None
        if cur.kind == "masked_fill" and isinstance(cur.x, fx.Node):
            return cur.x, ("not", cur.attrs["mask"])
        if cur.kind == "where" and isinstance(cur.x, fx.Node):
            return cur.x, cur.attrs["mask"]
        return None

    @staticmethod
    def _why_not(m: Attention, probs: Op, gm: fx.GraphModule) -> str | None:
        for n in m.chain:
            if len(ir.value_users(n)) > 1:
                return f"intermediate '{n.name}' is also used elsewhere"
        rank = len(ir.shape(probs.node) or ())
        dim = probs.attrs.get("dim")
        if rank == 0 or dim is None or dim not in (-1, rank - 1):
            return f"softmax over dim {dim}, not the last"
        if probs.attrs.get("dtype") not in (None, ir.dtype(probs.x)) or probs.attrs.get("half_to_float"):
            return "softmax changes dtype"
        qs, ks, vs = ir.shape(m.q), ir.shape(m.kt), ir.shape(m.v)
        if qs is None or ks is None or vs is None or min(len(qs), len(ks), len(vs)) < 3:
            return "Q, K, V need batch dimensions (rank ≥ 3)"
        if not (qs[:-2] == ks[:-2] == vs[:-2]):
            return f"batch dimensions differ: Q{qs} Kᵀ{ks} V{vs}"
        if ks[-2] != qs[-1] or vs[-2] != ks[-1]:
            return "shapes are not Q·Kᵀ·V"
        mask = m.mask[1] if isinstance(m.mask, tuple) else m.mask
        if isinstance(mask, fx.Node):
            ms = ir.shape(mask)
            if ms is None or len(ms) > len(qs) or ir.dtype(mask) not in (ir.dtype(m.q), torch.bool):
                return "mask is neither additive (query dtype) nor boolean"
            if ir.shape(m.out.node) != tuple(torch.broadcast_shapes(ms, qs[:-1] + (ks[-1],))[:-1]) + (vs[-1],):
                return f"mask {ms} broadcasts the scores to another shape"
        elif mask is not None:
            return "mask is a constant scalar"
        if ir.dtype(m.q) not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            return f"dtype {ir.dtype(m.q)}"
        return None

    def guard(self, m: Attention, ctx: Any):
        return m.reason

    def apply(self, m: Attention, ctx: Any):
        graph = m.out.node.graph
        gm = _gm(m.out)
        ktv = view(m.kt, gm)
        with graph.inserting_before(m.out.node):
            if ktv is not None and ktv.kind == "transpose" and len(m.kt.users) == 1 and \
                    sorted(_norm_dims([ktv.attrs["dim0"], ktv.attrs["dim1"]], len(ir.shape(m.kt)))) == \
                    [len(ir.shape(m.kt)) - 2, len(ir.shape(m.kt)) - 1]:
                k = ktv.x
            else:
                k = emit.transpose_last(graph, m.kt)
            mask = m.mask
            if isinstance(mask, tuple):  # masked_fill(m, -inf) keeps where m is False
                const = ir.fetch_attr(gm, mask[1].target) if mask[1].op == "get_attr" else None
                mask = (ir.const_node(graph, gm, ~const, "keep_mask") if isinstance(const, torch.Tensor)
                        else graph.call_function(torch.ops.aten.logical_not.default, (mask[1],)))
            new = emit.sdpa(graph, m.q, k, m.v, mask, m.scale)
        ir.replace(m.out.node, new, "fuse", [m.out.node, *m.chain])


def _norm_dims(dims: list[int], rank: int) -> list[int]:
    return [d % rank for d in dims]


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
    rules = (AttentionToSdpa("attention_to_sdpa"), GeluTanh("gelu_tanh"), MergeLinearChain("merge_linear_chain"),
             HorizontalLinear("horizontal_linear"), ActAdjacent("act_adjacent"))

    def run(self, program, ctx) -> bool:
        return apply_rules(program.gm, list(self.rules), ctx, ctx.stats)

