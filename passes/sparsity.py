"""sparse24: 2:4 semi-structured sparsity for GPUs with sparse tensor cores. Lossy (budgeted).

In every group of four consecutive weights along a linear's input dimension, two are kept and two
are zeroed::

    W'[o, 4g:4g+4] = W[o, 4g:4g+4] · m,   m keeps the 2 largest of |W[o, j]| · ‖X[:, j]‖

The importance is activation-aware when calibration data is present (Wanda: |W|·‖X‖ per input
feature), else the weight magnitude. Sparse tensor cores (A100, H100, H200, L4, RTX 4090) run such
a GEMM at up to twice the dense rate, in fp16/bf16/int8 (tf32 on Ampere and later).

When it pays: only where the layer is compute-bound on the target. The metadata and the sparse
kernel's lower efficiency eat the gain on small and memory-bound shapes (batch-1 decoding, small
hidden sizes: pytorch#111339 measured 2:4 slower than dense there), so the cost model credits no
memory saving and 75 % of the doubled compute rate; a layer the model predicts no gain for is
never proposed. On targets without sparse tensor cores (every CPU, V100, T4) the pass declines
with that reason instead of pretending. Legal for Linear (and addmm with a constant weight) whose
input dimension is a multiple of 4 and whose weight no other op reads; never exact.

On a CPU host the masked weights run dense: the model computes what the sparse model computes on
the target, and the report marks the gain as predicted for the target, not measured here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from optic import ir
from optic.budget.allocator import Action
from optic.budget.calibration import record_values
from optic.ir import emit
from optic.ir.opview import Op, view
from optic.ir.rewrite import Site, find_sites
from optic.pipeline import cost
from optic.pipeline.registry import register

SPARSE_EFFICIENCY = 0.75  # share of the 2x sparse tensor-core rate a real kernel reaches on large GEMMs
TENSOR_CORE_DTYPE = "float16"  # what the target runs a sparse GEMM in
RULE = "sparse24"


# -- the math ----------------------------------------------------------------------------------------
def mask_2_4(weight: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask keeping the 2 most important of every 4 consecutive weights along the last
    dimension. ``importance`` has the weight's shape (default ``|weight|``)."""
    if weight.shape[-1] % 4:
        raise ValueError(f"2:4 needs the input dimension to be a multiple of 4, got {weight.shape[-1]}")
    score = (weight.abs() if importance is None else importance).double()
    groups = score.reshape(*score.shape[:-1], -1, 4)
    keep = groups.topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(weight.shape)


def wanda_importance(weight: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """|W[o, j]| · ‖X[:, j]‖₂ over the calibration inputs of the layer (Sun et al., 2023)."""
    sq = torch.zeros(weight.shape[-1], dtype=torch.float64, device=weight.device)
    for x in inputs:
        sq += x.detach().double().reshape(-1, x.shape[-1]).pow(2).sum(0)
    return weight.abs().double() * sq.sqrt()


def predicted_seconds(m: int, n: int, k: int, itemsize: int, target: Any) -> tuple[float, float]:
    """Dense and 2:4-sparse GEMM time ``[m, k] × [k, n]`` on ``target`` (roofline, see module doc)."""
    flops = 2 * m * n * k
    nbytes = (m * k + k * n + m * n) * itemsize
    dense = cost.kernel_seconds(flops, nbytes, target, TENSOR_CORE_DTYPE)
    peak = target.peak_flops(TENSOR_CORE_DTYPE) or target.peak_flops("float32")
    launch = cost.kernel_seconds(0, 0, target)
    sparse = max(flops / (2 * SPARSE_EFFICIENCY * peak), nbytes / target.mem_bandwidth) + launch
    return dense, sparse


# -- the pass ----------------------------------------------------------------------------------------
def _guard(op: Op) -> str | None:
    """Why the linear ``op`` cannot be made 2:4 sparse, or None."""
    w = op.const("weight")
    if w is None:
        return "the weight is not a constant"
    if "bias" not in op.consts:
        return "the bias is computed, not a constant"
    if w.dim() != 2 or w.shape[1] % 4:
        return f"input dimension {tuple(w.shape)[-1]} is not a multiple of 4"
    if not w.is_floating_point():
        return f"weight dtype {w.dtype}"
    if ir.is_shared(op.node.graph.owning_module, w, op.node):
        return "the weight is shared with another op (tied weights)"
    if ir.shape(op.x) is None:
        return "input shape unknown"
    return None


class SparsifiableLinear(Site):
    """A linear whose weight can take a 2:4 mask (:func:`_guard` says why not)."""

    def guard(self, op: Op, ctx: Any) -> str | None:
        return _guard(op)


SITE = SparsifiableLinear(RULE, kinds=frozenset({"linear"}))


@register
class Sparse24:
    name = "sparse24"
    exact = False
    description = "2:4 semi-structured sparsity of linear weights, where the target's sparse tensor cores pay"
    options = ()

    def candidates(self, program: Any, ctx: Any) -> list[Action]:
        tgt = ctx.target
        if not getattr(tgt, "sparse_tensor_cores", False):
            ctx.note(f"target '{tgt.name}' has no sparse tensor cores: 2:4 sparsity cannot run faster there, "
                     "so no layer was made sparse (targets with them: a100, h100, h200, l4, rtx4090)")
            return []
        layers = find_sites(program.gm, SITE, ctx, ctx.stats)
        inputs = {}
        if ctx.calibration is not None and layers:
            inputs = record_values(program, [op.x for op in layers], ctx.calibration.fit_inputs())
        actions = []
        for op in layers:
            dense, sparse, gemm = _predicted(op, tgt)
            if sparse >= dense:
                ctx.stats.decline(RULE, op.node.name, f"no predicted gain at {gemm} on {tgt.name}: "
                                  "memory-bound or too small for the sparse kernel (pytorch#111339)")
                continue
            actions.append(self._action(op, dense, sparse, inputs.get(op.x.name)))
        return actions

    def _action(self, op: Op, dense: float, sparse: float, inputs: list[torch.Tensor] | None) -> Action:
        n, k = op.const("weight").shape
        importance = "activation-aware (|W|·‖X‖)" if inputs is not None else "weight magnitude"
        name = op.node.name
        return Action(
            pass_name=self.name, group=name, layer=ir.layer_name(op.node),
            describe=f"2:4 sparse [{n}×{k}], {importance}", level=0.5, nodes=frozenset({name}),
            predicted_gain_s=dense - sparse, apply=_applier(name, inputs), predicted_only=True,
            info={"predicted_speedup": dense / sparse, "importance": importance})

    def run(self, program: Any, ctx: Any) -> bool:
        """Without the allocator: make every proposed layer sparse (used by tests and by hand)."""
        actions = self.candidates(program, ctx)
        for a in actions:
            a.apply(program)
            ctx.stats.match("sparse24")  # as lowrank's and prune's runs count theirs
        return bool(actions)


def _predicted(op: Op, target: Any) -> tuple[float, float, str]:
    """Dense and sparse seconds of the linear ``op`` on ``target`` at its input shape, and the GEMM in words."""
    m = math.prod(ir.shape(op.x)[:-1])
    n, k = op.const("weight").shape
    dense, sparse = predicted_seconds(m, n, k, 2, target)
    return dense, sparse, f"[{m}×{k}]·[{k}×{n}]"


def _applier(name: str, inputs: list[torch.Tensor] | None):
    def apply(program: Any) -> None:
        gm = program.gm
        node = next(n for n in gm.graph.nodes if n.name == name)
        op = view(node, gm)
        w = op.const("weight")
        mask = mask_2_4(w, wanda_importance(w, inputs) if inputs else None)
        with gm.graph.inserting_before(node):
            wn = emit.constant(gm.graph, gm, (w * mask).to(w.dtype), "sparse24_w")
            bn = emit.constant(gm.graph, gm, op.const("bias"), "sparse24_b") if op.const("bias") is not None else None
            new = emit.linear(gm.graph, op.x, wn, bn)
        ir.replace(node, new, "sparse24")
        ir.eliminate_dead_code(gm)
        ir.drop_unused_constants(gm)
    return apply
