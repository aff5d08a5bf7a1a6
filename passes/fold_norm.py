"""fold_norm: fold normalization affines into neighbouring convolutions and linear layers. Exact.

Every fold is one mechanism: a per-channel affine ``y ↦ s·y + t`` next to a conv or linear.

- Eval-mode BatchNorm after a conv (1d/2d/3d, grouped, depthwise, transposed) or a linear::

      s = γ / √(σ² + ε),  t = β − μ·s
      W' = W·s (along the producer's output channels),  b' = s·b + t

  For a transposed conv the weight is ``(C_in, C_out/groups, k…)``: output channels are dim 1
  *within each group*, the case folders get wrong (ultralytics#25364). Declines when the BN uses
  batch statistics (training mode, ``track_running_stats=False``), when the producer's output
  has other users (they would see the folded values), when the producer's weight is tied to
  another op (folding would duplicate it), and for a linear whose features are not the dim BN
  normalizes.
- A BN that cannot fold becomes one ``addcmul`` (``x·s + t``) when it uses running statistics.
- LayerNorm / RMSNorm affine (γ, β), or any multiply by a constant per-feature vector (the
  hand-written RMSNorm of LLaMA/Qwen/T5), folds into the linears that read it::

      W' = W·diag(γ),  b' = b + W·β

  legal only when every user of the normalized value is a linear (through reshapes that keep the
  last dimension).

The math runs in float64 and is cast back to the weight's dtype (pytorch#120545).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from optic import ir
from optic.ir import emit
from optic.ir.opview import Op, view
from optic.ir.rewrite import Rule, apply_rules
from optic.pipeline.registry import register


# -- the math ----------------------------------------------------------------------------------
def bn_scale_shift(mean: torch.Tensor, var: torch.Tensor, gamma: torch.Tensor | None,
                   beta: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval mode as ``x·s + t`` (float64)."""
    s = torch.rsqrt(var.double() + eps)
    if gamma is not None:
        s = s * gamma.double()
    t = -mean.double() * s
    if beta is not None:
        t = t + beta.double()
    return s, t


def fold_output_affine(w: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor, t: torch.Tensor, *,
                       transposed: bool = False, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of ``s·conv(x; w, b) + t`` (per output channel) as one conv / linear."""
    w64 = w.double()
    if transposed:
        c_in, c_out_g = w.shape[0], w.shape[1]
        w64 = w64.reshape(groups, c_in // groups, c_out_g, *w.shape[2:])
        w64 = w64 * s.reshape(groups, 1, c_out_g, *([1] * (w.dim() - 2)))
        w64 = w64.reshape(w.shape)
    else:
        w64 = w64 * s.reshape(-1, *([1] * (w.dim() - 1)))
    b64 = t if b is None else s * b.double() + t
    return w64.to(w.dtype), b64.to(w.dtype)


def fold_input_affine(w: torch.Tensor, b: torch.Tensor | None, gamma: torch.Tensor | None,
                      beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of ``linear(γ⊙x + β; w, b)`` as one linear of x."""
    w64 = w.double()
    new_w = w64 * gamma.double().reshape(1, -1) if gamma is not None else w64
    new_b = None if b is None else b.double()
    if beta is not None:
        shift = w64 @ beta.double().reshape(-1)
        new_b = shift if new_b is None else new_b + shift
    return new_w.to(w.dtype), None if new_b is None else new_b.to(w.dtype)


# -- BatchNorm into its producer -----------------------------------------------------------------
def _bn_statistics_reason(bn: Op) -> str | None:
    if bn.attrs.get("training"):
        return "BatchNorm uses batch statistics (training mode or track_running_stats=False)"
    if bn.const("running_mean") is None or bn.const("running_var") is None:
        return "running statistics are not constants"
    for role in ("weight", "bias"):
        if role not in bn.consts:
            return f"BatchNorm {role} is computed, not a constant"
    return None


def _producer_reason(p: Op) -> str | None:
    """Why the conv or linear ``p`` cannot take a fold: other readers of its output or its weight, a
    computed or non-float weight."""
    if len(ir.value_users(p.node)) > 1:
        return f"producer '{p.node.name}' has {len(ir.value_users(p.node))} users: folding would change what the others see"
    w = p.const("weight")
    if w is None or "bias" not in p.consts:
        return f"{p.kind} weight or bias is computed, not a constant"
    if not w.is_floating_point():
        return f"{p.kind} weight is {w.dtype}, not floating point"
    if ir.is_shared(p.node.graph.owning_module, w, p.node):
        return f"{p.kind} weight is shared with another op (tied): folding would duplicate it"
    return None


def _channels_reason(p: Op, channels: int) -> str | None:
    """Why the BN's ``channels`` are not the output channels of ``p`` (or its weights cannot be rebuilt)."""
    w = p.const("weight")
    if p.kind == "linear":
        out_shape = ir.shape(p.node)
        if out_shape is None or len(out_shape) != 2:
            return "BatchNorm normalizes dim 1 but the linear's features are its last dim (input rank ≠ 2)"
        if w.shape[0] != channels:
            return f"channel count differs ({w.shape[0]} vs {channels})"
        return None
    if "output_size" in p.attrs:
        return "transposed conv called with output_size"
    if p.attrs.get("padding") is None and p.attrs.get("padding_str") is None:
        return "convolution padding is not expressible"
    out_ch = w.shape[1] * p.attrs["groups"] if p.attrs.get("transposed") else w.shape[0]
    if out_ch != channels:
        return f"channel count differs ({out_ch} vs {channels})"
    return None


@dataclass
class BnMatch:
    bn: Op
    producer: Op


class BnIntoProducer(Rule):
    def match(self, op: Op, ctx: Any):
        if op.kind != "batch_norm" or not isinstance(op.x, fx.Node) or op.attrs.get("tuple_out"):
            return None
        producer = view(op.x, op.node.graph.owning_module)
        if producer is None or producer.kind not in ("conv", "linear"):
            return None
        return BnMatch(op, producer)

    def guard(self, m: BnMatch, ctx: Any) -> str | None:
        return (_bn_statistics_reason(m.bn) or _producer_reason(m.producer)
                or _channels_reason(m.producer, m.bn.const("running_mean").numel()))

    def apply(self, m: BnMatch, ctx: Any) -> None:
        bn, p = m.bn, m.producer
        graph = p.node.graph
        gm = graph.owning_module
        s, t = bn_scale_shift(bn.const("running_mean"), bn.const("running_var"), bn.const("weight"),
                              bn.const("bias"), bn.attrs["eps"])
        w, b = fold_output_affine(p.const("weight"), p.const("bias"), s, t,
                                  transposed=bool(p.attrs.get("transposed")), groups=p.attrs.get("groups", 1))
        with graph.inserting_before(p.node):
            wn, bnode = emit.constant(graph, gm, w, "weight"), emit.constant(graph, gm, b, "bias")
            new = emit.conv(graph, p.x, wn, bnode, p.attrs) if p.kind == "conv" else emit.linear(graph, p.x, wn, bnode)
        ir.replace(bn.node, new, "fold_norm", [p.node, bn.node])


class BnToScaleShift(Rule):
    def match(self, op: Op, ctx: Any):
        if op.kind != "batch_norm" or not isinstance(op.x, fx.Node) or op.attrs.get("tuple_out"):
            return None
        return op

    def guard(self, op: Op, ctx: Any) -> str | None:
        if reason := _bn_statistics_reason(op):
            return reason
        rank = len(ir.shape(op.x) or ())
        return None if rank >= 2 else "input rank below 2"

    def apply(self, op: Op, ctx: Any) -> None:
        graph = op.node.graph
        gm = graph.owning_module
        s, t = bn_scale_shift(op.const("running_mean"), op.const("running_var"), op.const("weight"),
                              op.const("bias"), op.attrs["eps"])
        dt = ir.dtype(op.node) or op.const("running_mean").dtype
        trailing = [1] * (len(ir.shape(op.x)) - 2)
        with graph.inserting_before(op.node):
            sn = emit.constant(graph, gm, s.to(dt).reshape(-1, *trailing), "bn_scale")
            tn = emit.constant(graph, gm, t.to(dt).reshape(-1, *trailing), "bn_shift")
            new = emit.scale_shift(graph, op.x, sn, tn)
        ir.replace(op.node, new, "fold_norm")


# -- norm affine into the linears that read it ---------------------------------------------------------
@dataclass
class AffineMatch:
    op: Op
    gamma: torch.Tensor | None
    beta: torch.Tensor | None
    linears: list[Op]
    reason: str | None = None


def _per_feature_constant(op: Op) -> tuple[Any, torch.Tensor] | None:
    """For ``x · c`` with c a constant vector over the last dim: (x, c)."""
    gm = op.node.graph.owning_module
    for data, c in ((op.x, op.other), (op.other, op.x)):
        if isinstance(c, fx.Node) and c.op == "get_attr" and isinstance(data, fx.Node):
            t = ir.fetch_attr(gm, c.target)
            out = ir.shape(op.node)
            if isinstance(t, torch.Tensor) and out and t.numel() == out[-1] and t.dim() >= 1 \
                    and t.shape[-1] == out[-1] and ir.shape(data) == out:
                return data, t.reshape(-1)
    return None


def _linear_readers(node: fx.Node, gm: fx.GraphModule) -> tuple[list[Op], str | None]:
    """The linears that read ``node`` (through last-dim-preserving reshapes), or why not all do."""
    found: list[Op] = []
    stack = [node]
    last = (ir.shape(node) or (None,))[-1]
    while stack:
        n = stack.pop()
        for u in n.users:
            if ir.is_shape_query(u):
                continue
            uop = view(u, gm)
            if uop is None:
                return [], f"output also feeds '{u.name}' ({u.op} {getattr(u.target, '__name__', u.target)})"
            if uop.kind in ("reshape", "flatten") and uop.x is n and (ir.shape(u) or (None,))[-1] == last:
                stack.append(u)
            elif uop.kind == "linear" and uop.x is n and uop.const("weight") is not None and "bias" in uop.consts:
                found.append(uop)
            else:
                return [], f"output also feeds a {uop.kind} ('{u.name}'), not only linears"
    return found, None if found else "no users"


class NormAffineIntoLinear(Rule):
    def match(self, op: Op, ctx: Any):
        gm = op.node.graph.owning_module
        if op.kind in ("layer_norm", "rms_norm") and not op.attrs.get("tuple_out"):
            gamma, beta = op.const("weight"), op.const("bias")
            if gamma is None and beta is None:
                return None
            if op.kind == "layer_norm" and ("weight" not in op.consts or "bias" not in op.consts):
                return None
            if len(op.attrs.get("normalized_shape") or [0]) != 1:
                return AffineMatch(op, gamma, beta, [], "normalized over more than the last dim")
        elif op.kind == "mul":
            found = _per_feature_constant(op)
            if found is None:
                return None
            gamma, beta = found[1], None
        else:
            return None
        linears, reason = _linear_readers(op.node, gm)
        return AffineMatch(op, gamma, beta, linears, reason)

    def guard(self, m: AffineMatch, ctx: Any) -> str | None:
        if m.reason:
            return m.reason
        gm = m.op.node.graph.owning_module
        readers = ir.tensor_readers(gm)
        for lin in m.linears:
            if ir.is_shared(gm, lin.const("weight"), lin.node, readers):
                return f"weight of '{lin.node.name}' is shared with another op (tied): folding would duplicate it"
            if lin.const("weight").shape[1] != (m.gamma if m.gamma is not None else m.beta).numel():
                return f"'{lin.node.name}' input features differ from the normalized size"
        return None

    def apply(self, m: AffineMatch, ctx: Any) -> None:
        op = m.op
        graph = op.node.graph
        gm = graph.owning_module
        if op.kind == "mul":
            plain = _per_feature_constant(op)[0]
        else:
            with graph.inserting_before(op.node):
                shape = op.attrs["normalized_shape"]
                plain = (emit.layer_norm(graph, op.x, shape, op.attrs["eps"]) if op.kind == "layer_norm"
                         else emit.rms_norm(graph, op.x, shape, op.attrs.get("eps")))
            ir.stamp(plain, [op.node], "fold_norm")
        for lin in m.linears:
            w, b = fold_input_affine(lin.const("weight"), lin.const("bias"), m.gamma, m.beta)
            with graph.inserting_before(lin.node):
                new = emit.linear(graph, lin.x, emit.constant(graph, gm, w, "weight"), emit.constant(graph, gm, b, "bias"))
            ir.replace(lin.node, new, "fold_norm", [lin.node, op.node])
        op.node.replace_all_uses_with(plain)


@register
class FoldNorm:
    name = "fold_norm"
    exact = True
    description = "fold BatchNorm into conv/linear, standalone BN to scale-shift, norm affine into linears"
    options = ()
    rules = (BnIntoProducer("bn_into_conv_or_linear"), BnToScaleShift("bn_to_scale_shift"),
             NormAffineIntoLinear("norm_affine_into_linear"))

    def run(self, program, ctx) -> bool:
        return apply_rules(program.gm, list(self.rules), ctx, ctx.stats)
