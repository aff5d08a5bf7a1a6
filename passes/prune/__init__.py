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
"""

from __future__ import annotations

import copy
import inspect
import math
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from optic import ir
from optic.budget.allocator import Action
from optic.budget.calibration import iter_values, record_values
from optic.errors import OpticError
from optic.passes.prune.channels import Analysis, Edit, Group, analyse, set_shape_arg
from optic.pipeline import cost, timing
from optic.pipeline.registry import Option, register

FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)


# -- the math -------------------------------------------------------------------------------------------
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


def select_channels(importance: torch.Tensor, keep_units: int, unit: int = 1) -> torch.Tensor:
    """Indices (sorted) of the channels kept: the ``keep_units`` most important units of ``unit``
    consecutive channels."""
    per_unit = importance.double().reshape(-1, unit).sum(1)
    order = torch.sort(per_unit, descending=True, stable=True).indices[:keep_units].sort().values
    return (order[:, None] * unit + torch.arange(unit)).reshape(-1)


def removed_positions(removed: torch.Tensor, offset: int, scale: Fraction) -> torch.Tensor:
    """Positions along an axis of the removed channels: channel c covers indices c·s … c·s+s−1 from
    ``offset`` (s = ``scale``); with s < 1 one index covers 1/s channels (a head)."""
    if scale >= 1:
        s = int(scale)
        return (removed[:, None] * s + torch.arange(s)).reshape(-1) + offset
    return torch.unique(removed // int(1 / scale)) + offset


def drop(t: torch.Tensor, dims: dict[int, set[int]]) -> torch.Tensor:
    """A new tensor: ``t`` without the positions ``dims[d]`` along each dim d."""
    out = t.detach()
    for d, gone in dims.items():
        keep = [i for i in range(out.shape[d]) if i not in gone]
        out = out.index_select(d, torch.tensor(keep, dtype=torch.long))
    return out.clone()


# -- surgery --------------------------------------------------------------------------------------------
def _tensor(gm: fx.GraphModule, node: fx.Node, ref: tuple) -> torch.Tensor:
    if ref[0] == "module":
        return getattr(gm.get_submodule(node.target), ref[1])
    return ir.fetch_attr(gm, ref[1].target)


def _param_position(target: Any, name: str) -> int | None:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
        return names.index(name) if name in names else None
    try:
        sigs = [inspect.signature(target)]
    except (TypeError, ValueError):  # a builtin: its TorchScript schemas
        from torch.fx.operator_schemas import get_signature_for_torch_op

        sigs = get_signature_for_torch_op(target) or []
    found = {list(s.parameters).index(name) for s in sigs if name in s.parameters}
    return found.pop() if len(found) == 1 else None


def _shrink(value: Any, index: int | None, by: int) -> Any:
    if index is None:
        return value - by
    items = list(value)
    items[index] -= by
    return type(value)(items) if isinstance(value, tuple) else items


def _shrink_arg(node: fx.Node, name: str, index: int | None, by: int) -> None:
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: _shrink(node.kwargs[name], index, by)}
        return
    pos = _param_position(node.target, name)
    if pos is None or pos >= len(node.args):
        raise ValueError(f"prune: cannot find argument '{name}' of '{node.name}'")
    args = list(node.args)
    args[pos] = _shrink(args[pos], index, by)
    node.args = tuple(args)


def _shrink_split(node: fx.Node, index: int | None, dim: int, by: int) -> None:
    """Shrink a split's chunk size (``index`` None) or entry ``index`` of its sizes; a size computed at
    run time becomes the literal it evaluated to (read from the recorded shapes of the pieces)."""
    if len(node.args) > 1:
        where, value = 1, node.args[1]
    else:
        where = next(k for k in ("split_size", "split_sizes", "split_size_or_sections") if k in node.kwargs)
        value = node.kwargs[where]
    if isinstance(value, fx.Node):
        value = int(node.meta["tensor_meta"][index or 0].shape[dim])
    value = _shrink(value, index, by)
    if where == 1:
        node.args = (node.args[0], value, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, where: value}


def _copy_module(mod: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter and buffer tables (the original is never changed)."""
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)
    new._buffers = dict(mod._buffers)
    new._modules = dict(mod._modules)
    new._non_persistent_buffers_set = set(mod._non_persistent_buffers_set)
    return new


def _sync_sizes(mod: nn.Module) -> None:
    """Re-derive a module's size attributes from its (sliced) tensors."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        if mod.transposed:
            mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
        else:
            mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        t = mod.running_mean if mod.running_mean is not None else mod.weight
        if t is not None:
            mod.num_features = t.shape[0]


def _rebuild_module(gm: fx.GraphModule, node: fx.Node, tensors: dict[tuple, dict[int, set[int]]],
                    literals: dict[tuple, int]) -> None:
    mod = gm.get_submodule(node.target)
    new = _copy_module(mod)
    for ref, dims in tensors.items():
        name = ref[1]
        t = drop(getattr(mod, name), dims)
        if name in mod._parameters:
            new._parameters[name] = nn.Parameter(t, requires_grad=mod._parameters[name].requires_grad)
        else:
            new._buffers[name] = t
    for ref, by in literals.items():
        _, name, index = ref
        setattr(new, name, _shrink(getattr(new, name), index, by))
    _sync_sizes(new)
    *path, leaf = node.target.split(".")
    parent = gm.get_submodule(".".join(path)) if path else gm
    setattr(parent, leaf, new)


def slice_group(gm: fx.GraphModule, group: Group, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` of ``group`` in ``gm``: every tensor and size the group's edits name."""
    removed = torch.tensor(sorted(set(range(group.n)) - set(keep.tolist())), dtype=torch.long)
    if len(removed) == 0:
        return
    tensors: dict[fx.Node, dict[tuple, dict[int, set[int]]]] = {}
    literals: dict[fx.Node, dict[tuple, Fraction]] = {}
    for e in group.edits:
        if e.kind == "tensor":
            pos = removed_positions(removed, e.offset, e.scale).tolist()
            tensors.setdefault(e.node, {}).setdefault(e.ref, {}).setdefault(e.dim, set()).update(pos)
        else:
            per = literals.setdefault(e.node, {})
            per[e.ref] = per.get(e.ref, Fraction(0)) + len(removed) * e.scale
    for node in group.nodes:
        t_edits, l_edits = tensors.get(node, {}), literals.get(node, {})
        if not t_edits and not l_edits:
            continue
        by = {ref: int(v) for ref, v in l_edits.items()}
        if node.op == "call_module":
            _rebuild_module(gm, node, t_edits, by)
            continue
        for ref, dims in t_edits.items():
            old = ref[1]
            with gm.graph.inserting_before(node):
                new = ir.const_node(gm.graph, gm, drop(ir.fetch_attr(gm, old.target), dims), f"pruned_{old.name}")
            node.replace_input_with(old, new)
        for ref, n in by.items():
            if ref[0] == "shape":
                set_shape_arg(node, ref[1], ir.shape(node)[ref[1]] - n)
            elif ref[0] == "split":
                _shrink_split(node, ref[1], ref[2], n)
            else:
                _shrink_arg(node, ref[1], ref[2], n)


def prune_group(program: Any, key: tuple[str, ...], n: int, keep: torch.Tensor, *, shapes_fresh: bool = False) -> None:
    """Keep channels ``keep`` of the group ``key`` (see ``optic.passes.prune.channels.Group.key``) in ``program``.

    The analysis runs again on the program given (its shapes are recorded first unless
    ``shapes_fresh``), so pruning composes with earlier changes, prunes of other groups included:
    pruned nodes keep their names. The group must still have ``n`` channels."""
    gm = program.gm
    if not shapes_fresh:
        program.annotate_shapes()
    group = next((g for g in analyse(gm).groups if g.key == key), None)
    if group is None:
        raise ValueError(f"prune: the channel group of {', '.join(key)} is no longer in the graph "
                         "(another change rewrote its layers)")
    if group.reason:
        raise ValueError(f"prune: the channel group of {', '.join(key)} cannot be pruned here: {group.reason}")
    if group.n != n:
        raise ValueError(f"prune: the channel group of {', '.join(key)} has {group.n} channels, expected {n}")
    slice_group(gm, group, keep)
    ir.eliminate_dead_code(gm)
    ir.drop_unused_constants(gm)
    gm.recompile()


def _applier(key: tuple[str, ...], n: int, keep: torch.Tensor):
    def apply(program: Any) -> None:
        prune_group(program, key, n, keep)
    return apply


# -- importance -------------------------------------------------------------------------------------------
def magnitude_importance(gm: fx.GraphModule, group: Group) -> torch.Tensor:
    """L2 norm of each channel's producer rows, summed over the group's producers."""
    total = torch.zeros(group.n, dtype=torch.float64)
    for e in group.edits:
        if e.role == "producer":
            t = _tensor(gm, e.node, e.ref)
            if t.dim() >= 2:
                rows = t.detach().double().narrow(e.dim, e.offset, group.n).movedim(e.dim, 0)
                total += rows.reshape(group.n, -1).norm(dim=1)
    return total


def activation_importance(gm: fx.GraphModule, group: Group, consumers: list[tuple[fx.Node, Edit, int]],
                          mean_abs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ over consumers of mean|x_c| · ‖W[:, c]‖₂ (``mean_abs``: per index of the consumer's input axis)."""
    total = torch.zeros(group.n, dtype=torch.float64)
    for x, e, _ in consumers:
        s = int(e.scale)
        w = _tensor(gm, e.node, e.ref).detach().double().movedim(e.dim, 0)
        cols = w.reshape(w.shape[0], -1).norm(dim=1)[e.offset:e.offset + group.n * s].reshape(group.n, s)
        act = mean_abs[x.name][e.offset:e.offset + group.n * s].reshape(group.n, s)
        total += (act * cols).sum(1)
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


# -- timing the affected nodes ----------------------------------------------------------------------------------
def region_module(gm: fx.GraphModule, names: set[str]) -> tuple[fx.GraphModule, list[str]]:
    """The nodes ``names`` of ``gm`` as a module of their outside inputs (by name), for timing."""
    inside = [n for n in gm.graph.nodes if n.name in names]
    outside = []
    for n in inside:
        for a in n.all_input_nodes:
            if a.name not in names and a.op != "get_attr" and a not in outside:
                outside.append(a)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: graph.placeholder(a.name) for a in outside}

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            env[a] = graph.node_copy(a)
        return env[a]

    for n in inside:
        env[n] = graph.node_copy(n, lookup)
    outs = [env[n] for n in inside if not n.users or any(u.name not in names for u in n.users)]
    graph.output(tuple(outs))
    return fx.GraphModule(gm, graph), [a.name for a in outside]


def _signature(gm: fx.GraphModule, names: set[str]) -> str:
    parts = []
    for n in gm.graph.nodes:
        if n.name not in names:
            continue
        args = [ir.shape(a) if isinstance(a, fx.Node) else a for a in n.args]
        what = repr(gm.get_submodule(n.target)) if n.op == "call_module" else getattr(n.target, "__name__", n.target)
        parts.append(f"{n.op}:{what}:{args}:{ir.shape(n)}")
    return "|".join(parts)


# -- the pass -----------------------------------------------------------------------------------------------
def _owned(analysis: Analysis) -> dict[int, set[str]]:
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


@register
class Prune:
    name = "prune"
    exact = False
    description = "structured pruning of coupled channels, FFN neurons and attention heads (lossy, budgeted)"
    options = (
        Option("prune_importance", str, None, "how channels are ranked: by their activations on calibration data "
               "or by weight magnitude (unset: activation when there is calibration data)",
               choices=("activation", "magnitude")),
        Option("prune_multiple", int, None, "channels are kept in multiples of this (unset: the target's vector "
               "width)"),
        Option("prune_fraction", float, None, "without a budget: prune this fraction of every prunable group "
               "(unset: change nothing)"),
        Option("prune_measure_s", float, 0.15, "timing budget per group when the target is this machine"),
    )

    def _groups(self, program: Any, ctx: Any) -> tuple[Analysis, list[int]]:
        analysis = analyse(program.gm)
        prunable = []
        for i, g in enumerate(analysis.groups):
            if g.reason:
                ctx.stats.decline("prune", g.producers[0].name, g.reason)
            elif g.n // g.unit < 2:
                ctx.stats.decline("prune", g.producers[0].name, f"only {g.n // g.unit} unit(s) of {g.unit} channels")
            else:
                prunable.append(i)
        return analysis, prunable

    def _importance(self, program: Any, analysis: Analysis, prunable: list[int], ctx: Any) -> tuple[str, dict[int, torch.Tensor]]:
        wanted = ctx.option("prune_importance", "activation" if ctx.calibration is not None else "magnitude")
        if wanted not in ("activation", "magnitude"):
            raise OpticError(f"prune_importance={wanted!r}: use 'activation' or 'magnitude'")
        if wanted == "activation" and ctx.calibration is None:
            ctx.note("prune_importance='activation' needs calibration data: used the weight magnitude")
            wanted = "magnitude"
        gm = program.gm
        scores = {i: magnitude_importance(gm, analysis.groups[i]) for i in prunable}
        if wanted == "magnitude":
            return wanted, scores
        consumers = {i: [c for s in analysis.groups[i].spaces for c in analysis.consumer_inputs.get(s, [])] for i in prunable}
        means = mean_abs_inputs(program, [c for cs in consumers.values() for c in cs], ctx.calibration.fit_inputs())
        for i in prunable:
            if consumers[i]:
                scores[i] = activation_importance(gm, analysis.groups[i], consumers[i], means)
        return wanted, scores

    def _multiple(self, group: Group, gm: fx.GraphModule, ctx: Any) -> int:
        m = ctx.option("prune_multiple")
        if m is None:
            w = next((_tensor(gm, e.node, e.ref) for e in group.edits if e.role == "producer"), None)
            m = preferred_multiple(ctx.target, None if w is None else w.dtype)
        return max(1, int(m) // math.gcd(int(m), group.unit))

    def run(self, program: Any, ctx: Any) -> bool:
        """Prune every prunable group by the option ``prune_fraction`` (None or 0: no change)."""
        fraction = ctx.option("prune_fraction")
        if not fraction:
            return False
        analysis, prunable = self._groups(program, ctx)
        kind, scores = self._importance(program, analysis, prunable, ctx)
        plan = []  # decided on the unpruned program: pruning one group rewrites nodes other groups read
        for i in prunable:
            g = analysis.groups[i]
            keep_units = keep_count(g.n // g.unit, float(fraction), self._multiple(g, program.gm, ctx))
            if keep_units * g.unit < g.n:
                plan.append((g.key, g.n, select_channels(scores[i], keep_units, g.unit)))
        for j, (key, n, keep) in enumerate(plan):
            prune_group(program, key, n, keep, shapes_fresh=j == 0)
            ctx.stats.match("prune")
        changed = bool(plan)
        if changed:
            program.annotate_shapes()
        return changed

    def candidates(self, program: Any, ctx: Any) -> list[Action]:
        analysis, prunable = self._groups(program, ctx)
        if not prunable:
            return []
        kind, scores = self._importance(program, analysis, prunable, ctx)
        owned = _owned(analysis)
        outside: dict[str, Any] = {}
        if ctx.measure:  # the values entering each group's nodes, to time them alone
            gm = program.gm
            names = {a for i in prunable for a in region_module(gm, {n.name for n in analysis.groups[i].nodes})[1]}
            by_name = {n.name: n for n in gm.graph.nodes}
            rec = record_values(program, [by_name[a] for a in sorted(names)],
                                [(program.example_args, program.example_kwargs)])
            outside = {k: v[0] for k, v in rec.items()}
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
                    ctx.stats.decline("prune", g.producers[0].name, f"surgery failed: {type(e).__name__}: {e}")
                    break
                if action is not None:
                    actions.append(action)
        return actions

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
            t0, t1 = self._time(gm, trial.gm, names, outside, float(ctx.option("prune_measure_s", 0.15)), cache)
            info["region_s"] = (t0, t1)
            if t1 >= t0:
                ctx.stats.decline("prune", g.producers[0].name,
                                  f"prune {what}: not faster here ({t0 * 1e6:.1f} → {t1 * 1e6:.1f} µs)")
                return None
        more = f" +{len(g.producers) - 3} more" if len(g.producers) > 3 else ""
        return Action(
            pass_name=self.name, group=f"prune:{g.key[0]}" + (f"+{len(g.key) - 1}" if len(g.key) > 1 else ""),
            layer=", ".join(ir.layer_name(p) for p in g.producers[:3]) + more,
            describe=f"prune {what} ({kind} importance)", level=1 - len(keep) / g.n, nodes=frozenset(owned),
            touches=frozenset(names - owned),
            predicted_gain_s=before_s - after_s, apply=_applier(g.key, g.n, keep), info=info)

    @staticmethod
    def _time(before: fx.GraphModule, after: fx.GraphModule, names: set[str], outside: dict[str, Any],
              budget_s: float, cache: dict) -> tuple[float, float]:
        key = (_signature(before, names), _signature(after, names))
        if key not in cache:
            m0, in0 = region_module(before, names)
            m1, in1 = region_module(after, names)
            a0, a1 = [outside[n] for n in in0], [outside[n] for n in in1]
            fns = {"before": lambda: m0(*a0), "after": lambda: m1(*a1)}
            block = timing.calls_per_block(fns["before"], target_s=0.01, cap=50)
            t = timing.compare(fns, rounds=7, block=block, warmup=1, budget_s=budget_s)
            cache[key] = (t["before"].median, t["after"].median)
        return cache[key]
