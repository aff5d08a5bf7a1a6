"""Which channels a group keeps, and how many: importance per channel, kept counts per level.

Importance, per channel summed over the group: ``"activation"`` Σ over consumers of
mean|x_c| · ‖W[:, c]‖₂ (the consumer's input on calibration data times the norm of the weights that
read it); ``"magnitude"`` ‖W[c]‖₂ of the producer rows. Kept counts are rounded to the target's
preferred multiple; heads (units of several channels) are kept or removed whole.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from optic.budget.calibration import iter_values

from .channels import Analysis, Edit, Group

FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)  # the levels proposed to the allocator
IMPORTANCES = ("activation", "magnitude")


# -- how many ---------------------------------------------------------------------------------------------
def preferred_multiple(target: Any, dtype: torch.dtype | None = None) -> int:
    """Channel counts the target runs best: fp32 SIMD lanes on a CPU, 8 on a GPU (16 for fp16/bf16)."""
    if target is None:
        return 1
    if getattr(target, "kind", None) == "gpu":
        return 16 if dtype in (torch.float16, torch.bfloat16) else 8
    return getattr(target, "vector_lanes_fp32", None) or 8


def keep_count(n_units: int, fraction: float, multiple: int) -> int:
    """Units kept when removing ``fraction`` of ``n_units``: rounded to ``multiple`` (halved while the
    group has fewer than four multiples, so small groups are not rounded away), at least one multiple."""
    m = max(1, multiple)
    while m > 1 and n_units < 4 * m:
        m //= 2
    keep = math.floor(n_units * (1 - fraction) / m + 0.5) * m
    return min(n_units, max(m, keep, 1))


# -- which ----------------------------------------------------------------------------------------------------
def select_channels(importance: torch.Tensor, keep_units: int, unit: int = 1) -> torch.Tensor:
    """Indices (sorted) of the channels kept: the ``keep_units`` most important units of ``unit``
    consecutive channels."""
    per_unit = importance.double().reshape(-1, unit).sum(1)
    order = torch.sort(per_unit, descending=True, stable=True).indices[:keep_units].sort().values
    return (order[:, None] * unit + torch.arange(unit, device=order.device)).reshape(-1)


def importance(program: Any, analysis: Analysis, groups: list[int], kind: str, calibration: Any = None
               ) -> dict[int, torch.Tensor]:
    """Per group index in ``groups``: the importance of each channel by ``kind`` (``"activation"``
    reads the consumers' inputs on the fit split of ``calibration``; a group without consumers
    keeps the magnitude)."""
    gm = program.gm
    scores = {i: magnitude_importance(gm, analysis.groups[i]) for i in groups}
    if kind == "magnitude":
        return scores
    consumers = {i: [c for s in analysis.groups[i].spaces for c in analysis.consumer_inputs.get(s, [])] for i in groups}
    means = mean_abs_inputs(program, [c for cs in consumers.values() for c in cs], calibration.fit_inputs())
    for i in groups:
        if consumers[i]:
            scores[i] = activation_importance(gm, analysis.groups[i], consumers[i], means)
    return scores


def magnitude_importance(gm: fx.GraphModule, group: Group) -> torch.Tensor:
    """L2 norm of each channel's producer rows, summed over the group's producers."""
    total = torch.zeros(group.n, dtype=torch.float64, device="cpu")  # scores are small: on the CPU
    for e in group.edits:
        if e.role == "producer":
            t = e.tensor(gm)
            if t.dim() >= 2:
                rows = t.detach().double().narrow(e.dim, e.offset, group.n).movedim(e.dim, 0)
                total += rows.reshape(group.n, -1).norm(dim=1).cpu()
    return total


def activation_importance(gm: fx.GraphModule, group: Group, consumers: list[tuple[fx.Node, Edit, int]],
                          mean_abs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over consumers of mean|x_c| · ‖W[:, c]‖₂ (``mean_abs``: per index of the consumer's input axis)."""
    total = torch.zeros(group.n, dtype=torch.float64, device="cpu")
    for x, e, _ in consumers:
        s = int(e.scale)
        w = e.tensor(gm).detach().double().movedim(e.dim, 0)
        cols = w.reshape(w.shape[0], -1).norm(dim=1)[e.offset:e.offset + group.n * s].reshape(group.n, s)
        act = mean_abs[x.name][e.offset:e.offset + group.n * s].reshape(group.n, s)
        total += (act.cpu() * cols.cpu()).sum(1)
    return total


def mean_abs_inputs(program: Any, consumers: list[tuple[fx.Node, Edit, int]], inputs: list) -> dict[str, torch.Tensor]:
    """mean|x| per index of the channel axis of every consumer input, over the calibration inputs."""
    axes = {x.name: (x, axis) for x, _, axis in consumers}
    nodes = [x for x, _ in axes.values()]
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    for values in iter_values(program, nodes, inputs):  # memory stays at one batch of activations
        for name, (_, axis) in axes.items():
            v = values[name].detach().double().abs()
            v = v.movedim(axis, -1).reshape(-1, v.shape[axis])
            sums[name] = sums.get(name, 0) + v.sum(0)
            rows[name] = rows.get(name, 0) + v.shape[0]
    return {k: sums[k] / max(rows[k], 1) for k in sums}
