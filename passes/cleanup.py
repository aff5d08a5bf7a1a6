"""cleanup: remove no-ops, fold constant subgraphs, drop dead code. Exact.

- ``remove_noop``: ``y = f(x)`` where f computes x unchanged (eval-mode or p=0 dropout,
  ``nn.Identity``, ``alias``/``detach``, a cast to the dtype x already has) becomes ``y = x``.
- ``constant_fold``: a pure, deterministic op whose inputs are all constants (parameters, buffers,
  literals, and in exported graphs the fixed input shapes) is evaluated once and becomes a
  constant. Declines when the folded value would grow the model (it is larger than what it
  consumes and the inputs stay alive, e.g. an ``expand`` of a weight another op still reads).
- dead code elimination (ops whose value nobody reads and that have no effect).

Graphs captured with torch.fx keep shape computations on the inputs (``x.size(0)``) live, so
the fx path stays shape-generic; exported graphs are already static.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from optic import ir
from optic.ir.opview import Op, is_noop
from optic.ir.rewrite import OPAQUE, Rule, apply_rules
from optic.pipeline.registry import register

# Values whose folding would change what the model computes or bloat it for no gain.
_RANDOM = ("rand", "normal", "bernoulli", "dropout", "uniform", "multinomial", "poisson", "empty")
_FOLD_LIMIT = 1 << 16  # elements: a folded value this small never counts as growth


class RemoveNoop(Rule):
    def match(self, op: Op, ctx: Any):
        if not isinstance(op.x, fx.Node) or not op.node.users:
            return None
        why = is_noop(op)
        return (op, why) if why else None

    def guard(self, m, ctx):
        op, _ = m
        if ir.is_inplace(op.node):
            return "in-place op"
        a, b = ir.shape(op.x), ir.shape(op.node)
        if a is not None and b is not None and a != b:
            return f"shape changes {a} -> {b}"
        return None

    def apply(self, m, ctx):
        op, _ = m
        op.node.replace_all_uses_with(op.x)
        op.node.graph.erase_node(op.node)  # a no-op has no effect, even if fx deems it impure (random)


def _deterministic(node: fx.Node) -> bool:
    name = str(getattr(node.target, "__name__", node.target)).lower()
    return not any(r in name for r in _RANDOM)


# Constant folding keeps its own traversal, not the rule driver's, for two reasons. It must evaluate
# any pure op (``ones``, ``tril``, ``arange``, ``sin``, ...), and the driver visits only the ops the op
# view classifies. And it decides on maximal constant subgraphs, a forward dataflow then a frontier:
# whether a fold grows the model depends on every constant the whole subgraph frees, and folding op
# by op would materialize each intermediate as a constant of its own.
def constant_values(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Every node whose value is fixed, with that value: constants (``get_attr``), and pure,
    deterministic ops whose inputs are all fixed, evaluated once here (in graph order, so inputs
    come first). An op that cannot be evaluated here (it needs a device) is left to run time."""
    const: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const[node] = ir.fetch_attr(gm, node.target)
        elif _foldable(node, const):
            try:
                const[node] = _evaluate(node, const)
            except Exception:  # not evaluable here (e.g. needs a device): leave it to run time
                continue
    return const


def _foldable(node: fx.Node, const: dict[fx.Node, Any]) -> bool:
    return node.op in ("call_function", "call_method") and not ir.is_inplace(node) and _deterministic(node) \
        and all(a in const for a in node.all_input_nodes) and not node.is_impure()


def _evaluate(node: fx.Node, const: dict[fx.Node, Any]) -> Any:
    args, kwargs = fx.map_arg((node.args, node.kwargs), lambda a: const[a])
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)


def _live_outputs(const: dict[fx.Node, Any]) -> list[fx.Node]:
    """The computed constants something outside the constant subgraphs reads: what gets folded."""
    return [n for n in const if n.op != "get_attr" and any(u not in const for u in n.users)]


def _fold(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor | int | float | bool) -> None:
    """Replace ``node`` by its value: a new constant for a tensor, the number itself in its users' arguments."""
    if isinstance(value, torch.Tensor):
        with gm.graph.inserting_before(node):
            new = ir.const_node(gm.graph, gm, value.detach().clone(), node.name)
        ir.replace(node, new, "cleanup")
        return
    for user in list(node.users):
        user.args, user.kwargs = fx.map_arg((user.args, user.kwargs), lambda a, n=node, v=value: v if a is n else a)


def fold_constants(program, stats) -> bool:
    """Evaluate every maximal constant subgraph once; replace its live outputs with constants."""
    gm = program.gm
    const = constant_values(gm)
    changed = False
    for node in _live_outputs(const):
        value = const[node]
        if not isinstance(value, torch.Tensor | int | float | bool):
            continue
        if isinstance(value, torch.Tensor) and (reason := _growth(node, value, const)):
            stats.decline("constant_fold", node.name, reason)
            continue
        _fold(gm, node, value)
        stats.match("constant_fold")
        changed = True
    if changed:
        ir.eliminate_dead_code(gm)
        ir.drop_unused_constants(gm)
        gm.recompile()
    return changed


def _growth(node: fx.Node, value: torch.Tensor, const: dict) -> str | None:
    """Why folding ``node`` would make the model larger, or None."""
    if value.numel() <= _FOLD_LIMIT:
        return None
    # constants the subgraph reads that something outside it keeps alive
    subgraph, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in subgraph:
            continue
        subgraph.add(n)
        stack.extend(a for a in n.all_input_nodes if a in const)
    freed = 0
    for n in subgraph:
        if n.op == "get_attr" and isinstance(const[n], torch.Tensor):
            outside = {u for u in n.users if u not in subgraph}
            if not outside:
                freed += const[n].numel()
    if value.numel() > freed:
        return f"folded value ({value.numel()} elements) is larger than the constants it frees ({freed})"
    return None


ASSERTS = frozenset({torch.ops.aten._assert_tensor_metadata.default})


@dataclass
class DropMetadataAssert(Rule):
    """Export's dtype/device asserts: on a static, verified graph they always hold. An assert computes
    nothing, so the op view does not classify it: the rule names it (``targets``)."""

    def match(self, op: Op, ctx: Any) -> Op | None:
        return op if op.kind == OPAQUE else None

    def apply(self, op: Op, ctx: Any) -> None:
        op.node.graph.erase_node(op.node)


@register
class Cleanup:
    name = "cleanup"
    exact = True
    description = "remove no-ops (eval dropout, identity, same-dtype casts), fold constant subgraphs, dead code"
    options = ()

    def run(self, program, ctx) -> bool:
        gm = program.gm
        changed = apply_rules(gm, [RemoveNoop("remove_noop")], ctx, ctx.stats)
        changed |= fold_constants(program, ctx.stats)
        changed |= apply_rules(gm, [DropMetadataAssert("metadata_assert", targets=ASSERTS)], ctx, ctx.stats)
        for _ in range(ir.eliminate_dead_code(gm)):
            ctx.stats.match("dead_code")
            changed = True
        if changed:
            gm.recompile()
        return changed
