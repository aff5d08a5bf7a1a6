"""prune: structured pruning of channels, neurons and attention heads. Lossy (budgeted).

A channel group (``optic.passes.prune.channels``: coupled output channels of convs/linears, e.g. conv→bn→relu→conv,
the neurons of an FFN, every producer of a residual stream, the heads of q/k/v) keeps the index set
K of its ``n`` channels, the same K in every coupled space::

    producer   W' = W[K, …], b' = b[K]              (transposed conv: W[:, K])
    through    BatchNorm γ, β, μ, σ²[K]; depthwise conv W[K], groups = |K|; LayerNorm γ, β[K]
    consumer   W' = W[:, K̂],  K̂ = offset + {c·s + j : c ∈ K, 0 ≤ j < s}   (s features per channel after a flatten)
    sizes      a literal size along the channel axis shrinks by (n − |K|)·s (view sizes, normalized_shape)

Exact when the removed channels reach every consumer as zeros (their producer rows and biases are
zero and what lies between maps 0 to 0); otherwise lossy, and LayerNorm over pruned channels
normalizes over fewer of them. Legal only where the analysis proves the graph stays consistent
(see ``optic.passes.prune.channels``): a group whose channels reach the output, meet fixed channels (a graph
input, a grouped conv) or an op not understood on their axis is declined with that reason.

Which channels: K keeps the most important ones. Importance, per channel summed over the group:
``"activation"`` (default with calibration data) Σ over consumers of mean|x_c| · ‖W[:, c]‖₂, the
consumer's input on the fit split times the norm of the weights that read it; ``"magnitude"``
(without calibration) the L2 norm of the producer rows. Heads are kept or removed whole.

How much: levels remove 1/8 … 3/4 of a group, with kept counts rounded to the target's preferred
multiple (CPU: fp32 vector lanes; GPU: 8, 16 for fp16/bf16 tensor cores), halved for small groups
so they are not rounded away, never below one channel. The predicted gain is the roofline time
(``optic.pipeline.cost``) of the nodes that compute on the group, before minus after. With ``ctx.measure``
those nodes are timed before and after at their recorded inputs (``optic.pipeline.timing.compare``) and a
level that is not faster here is not proposed.

An action re-runs the analysis on the program it is given, so actions of different groups compose
in any order (a conv that consumes one group and produces another is sliced by both). Its ``nodes``
are the layers only its group rewrites (producers, BatchNorms, depthwise convs): listing shared
consumers would make every two adjacent groups conflict in the allocator.

Options (declared on the pass, see ``optic passes``): ``prune_fraction``, ``prune_importance``,
``prune_multiple``, ``prune_measure_s``. Pruned weights are not fine-tuned.

The package, one concern per module: ``channels`` (the analysis: the walk and the groups),
``transfer`` (its table: what each kind of op does with channels), ``spaces`` (the analysis's
state), ``selection`` (importance, levels, which channels stay), ``surgery`` (cutting the removed
channels out of the graph), ``region`` (timing the nodes a group computes on); this module is the
pass: find the groups on the rule driver, score them, then prune (``run``) or propose (``candidates``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from optic import ir
from optic.budget.allocator import Action
from optic.budget.calibration import record_values
from optic.errors import OpticError
from optic.ir.rewrite import Several, Site, find_sites
from optic.pipeline import cost
from optic.pipeline.registry import Option, register

from .channels import Analysis, Group, analyse
from .region import region_module, time_region
from .selection import FRACTIONS, IMPORTANCES, importance, keep_count, preferred_multiple, select_channels
from .surgery import prune_group, removed_positions
from .transfer import PRODUCERS

__all__ = ["FRACTIONS", "Prune", "keep_count", "preferred_multiple", "prune_group", "removed_positions",
           "select_channels"]

RULE = "prune"


# -- where: the groups, found on the driver at their first producer ---------------------------------------
@dataclass
class GroupSite(Site):
    """A channel group, found at its first producer: legal when the analysis gave no reason against it
    and it has at least two units to choose from. ``led``: per producer, the groups it is the first
    producer of (indices into ``groups``, in their order): several when a split cuts its channels into
    pieces pruned apart."""

    kinds: frozenset[str] = PRODUCERS
    groups: list[Group] = field(default_factory=list)
    led: dict[fx.Node, list[int]] = field(default_factory=dict)

    def match(self, op: Any, ctx: Any) -> Several | None:
        led = self.led.get(op.node)
        return Several(led) if led else None

    def guard(self, i: int, ctx: Any) -> str | None:
        g = self.groups[i]
        if g.reason:
            return g.reason
        if g.n // g.unit < 2:
            return f"only {g.n // g.unit} unit(s) of {g.unit} channels"
        return None


def find_groups(analysis: Analysis, gm: fx.GraphModule, ctx: Any) -> list[int]:
    """Indices of the groups that can be pruned; every other group is declined at its first producer."""
    led: dict[fx.Node, list[int]] = {}
    for i, g in enumerate(analysis.groups):
        led.setdefault(g.producers[0], []).append(i)
    return sorted(find_sites(gm, GroupSite(RULE, groups=analysis.groups, led=led), ctx, ctx.stats))


def owned_nodes(analysis: Analysis) -> dict[int, set[str]]:
    """Per group: the nodes only it rewrites (its producers and the layers between them and the
    consumers). Consumers are shared with the group that produces their outputs and compose with it."""
    writers: dict[str, set[int]] = {}
    for i, g in enumerate(analysis.groups):
        for e in g.edits:
            if e.kind == "tensor":
                writers.setdefault(e.node.name, set()).add(i if e.role != "consumer" else -1)
    owned = {}
    for i, g in enumerate(analysis.groups):
        owned[i] = {p.name for p in g.producers} | {
            e.node.name for e in g.edits if e.kind == "tensor" and writers.get(e.node.name) == {i}}
    return owned


def _applier(key: tuple[str, ...], n: int, keep: torch.Tensor):
    def apply(program: Any) -> None:
        prune_group(program, key, n, keep)
    return apply


# -- the pass ---------------------------------------------------------------------------------------------------
@register
class Prune:
    name = RULE
    exact = False
    description = "structured pruning of coupled channels, FFN neurons and attention heads (lossy, budgeted)"
    options = (
        Option("prune_importance", str, None, "how channels are ranked: by their activations on calibration data "
               "or by weight magnitude (unset: activation when there is calibration data)",
               choices=IMPORTANCES),
        Option("prune_multiple", int, None, "channels are kept in multiples of this (unset: the target's vector "
               "width)"),
        Option("prune_fraction", float, None, "without a budget: prune this fraction of every prunable group "
               "(unset: change nothing)"),
        Option("prune_measure_s", float, 0.15, "timing budget per group when the target is this machine"),
    )

    def run(self, program: Any, ctx: Any) -> bool:
        """Prune every prunable group by the option ``prune_fraction`` (None or 0: no change)."""
        fraction = ctx.option("prune_fraction")
        if not fraction:
            return False
        analysis = analyse(program.gm)
        prunable = find_groups(analysis, program.gm, ctx)
        scores = importance(program, analysis, prunable, self._importance_kind(ctx), ctx.calibration)
        plan = []  # decided on the unpruned program: pruning one group rewrites nodes other groups read
        for i in prunable:
            g = analysis.groups[i]
            keep_units = keep_count(g.n // g.unit, float(fraction), self._multiple(g, program.gm, ctx))
            if keep_units * g.unit < g.n:
                plan.append((g.key, g.n, select_channels(scores[i], keep_units, g.unit)))
        for j, (key, n, keep) in enumerate(plan):
            prune_group(program, key, n, keep, shapes_fresh=j == 0)
            ctx.stats.match(RULE)
        if plan:
            program.annotate_shapes()
        return bool(plan)

    def candidates(self, program: Any, ctx: Any) -> list[Action]:
        analysis = analyse(program.gm)
        prunable = find_groups(analysis, program.gm, ctx)
        if not prunable:
            return []
        kind = self._importance_kind(ctx)
        scores = importance(program, analysis, prunable, kind, ctx.calibration)
        owned = owned_nodes(analysis)
        outside = self._region_inputs(program, analysis, prunable) if ctx.measure else {}
        cache: dict[tuple[str, str], tuple[float, float]] = {}
        actions = []
        for i in prunable:
            g = analysis.groups[i]
            n_units, seen = g.n // g.unit, set()
            multiple = self._multiple(g, program.gm, ctx)
            for fraction in FRACTIONS:
                keep_units = keep_count(n_units, fraction, multiple)
                if keep_units >= n_units or keep_units in seen:
                    continue
                seen.add(keep_units)
                try:
                    action = self._action(program, g, select_channels(scores[i], keep_units, g.unit), kind,
                                          owned[i], ctx, outside, cache)
                except Exception as e:  # the analysis allowed it, so this is a bug: decline, never crash
                    ctx.stats.decline(RULE, g.producers[0].name, f"surgery failed: {type(e).__name__}: {e}")
                    break
                if action is not None:
                    actions.append(action)
        return actions

    # -- steps ----------------------------------------------------------------------------------------------
    @staticmethod
    def _importance_kind(ctx: Any) -> str:
        wanted = ctx.option("prune_importance")
        if wanted is None:
            wanted = "activation" if ctx.calibration is not None else "magnitude"
        if wanted not in IMPORTANCES:
            raise OpticError(f"prune_importance={wanted!r}: use 'activation' or 'magnitude'")
        if wanted == "activation" and ctx.calibration is None:
            ctx.note("prune_importance='activation' needs calibration data: used the weight magnitude")
            wanted = "magnitude"
        return wanted

    @staticmethod
    def _multiple(group: Group, gm: fx.GraphModule, ctx: Any) -> int:
        m = ctx.option("prune_multiple")
        if m is None:
            w = next((e.tensor(gm) for e in group.edits if e.role == "producer"), None)
            m = preferred_multiple(ctx.target, None if w is None else w.dtype)
        return max(1, int(m) // math.gcd(int(m), group.unit))

    @staticmethod
    def _region_inputs(program: Any, analysis: Analysis, prunable: list[int]) -> dict[str, Any]:
        """The values entering each group's nodes on the example inputs, to time the nodes alone."""
        gm = program.gm
        names = {a for i in prunable for a in region_module(gm, {n.name for n in analysis.groups[i].nodes})[1]}
        by_name = {n.name: n for n in gm.graph.nodes}
        rec = record_values(program, [by_name[a] for a in sorted(names)], [(program.example_args, program.example_kwargs)])
        return {k: v[0] for k, v in rec.items()}

    def _action(self, program: Any, g: Group, keep: torch.Tensor, kind: str, owned: set[str], ctx: Any,
                outside: dict[str, Any], cache: dict) -> Action | None:
        """The action keeping channels ``keep`` of ``g``, or None when it is not faster here."""
        gm, target = program.gm, ctx.target
        names = {n.name for n in g.nodes}
        trial = program.clone()
        prune_group(trial, g.key, g.n, keep, shapes_fresh=True)
        trial.annotate_shapes()
        before_s = sum(cost.node_seconds(n, gm, target) for n in g.nodes)
        after_s = sum(cost.node_seconds(n, trial.gm, target) for n in trial.gm.graph.nodes if n.name in names)
        n_units, keep_units = g.n // g.unit, len(keep) // g.unit
        what = f"{n_units - keep_units} of {n_units} heads" if g.unit > 1 else f"{g.n - len(keep)} of {g.n} channels"
        info: dict[str, Any] = {"channels": (g.n, len(keep)), "importance": kind}
        if g.unit > 1:
            info["heads"] = (n_units, keep_units)
        if ctx.measure:
            t0, t1 = time_region(gm, trial.gm, names, outside, float(ctx.option("prune_measure_s")), cache)
            info["region_s"] = (t0, t1)
            if t1 >= t0:
                ctx.stats.decline(RULE, g.producers[0].name,
                                  f"prune {what}: not faster here ({t0 * 1e6:.1f} → {t1 * 1e6:.1f} µs)")
                return None
        more = f" +{len(g.producers) - 3} more" if len(g.producers) > 3 else ""
        return Action(
            pass_name=self.name, group=f"prune:{g.key[0]}" + (f"+{len(g.key) - 1}" if len(g.key) > 1 else ""),
            layer=", ".join(ir.layer_name(p) for p in g.producers[:3]) + more,
            describe=f"prune {what} ({kind} importance)", level=1 - len(keep) / g.n, nodes=frozenset(owned),
            touches=frozenset(names - owned),
            predicted_gain_s=before_s - after_s, apply=_applier(g.key, g.n, keep), info=info)
