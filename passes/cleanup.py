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

from typing import Any

import torch
import torch.fx as fx

from optic import ir
from optic.ir.opview import Op, is_noop
from optic.ir.rewrite import Rule, apply_rules
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


def fold_constants(program, stats) -> bool:
    """Evaluate every maximal constant subgraph once; replace its live outputs with constants."""
    gm = program.gm
    const: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const[node] = ir.fetch_attr(gm, node.target)
        elif node.op in ("call_function", "call_method") and not ir.is_inplace(node) and _deterministic(node) \
                and all(a in const for a in node.all_input_nodes) and not node.is_impure():
            try:
                args, kwargs = fx.map_arg((node.args, node.kwargs), lambda a: const[a])
                with torch.no_grad():
                    fn = node.target if node.op == "call_function" else getattr(args[0], node.target)
                    const[node] = fn(*args, **kwargs) if node.op == "call_function" else fn(*args[1:], **kwargs)
            except Exception:  # not evaluable here (e.g. needs a device): leave it to run time
                continue
    frontier = [n for n in const if n.op != "get_attr" and any(u not in const for u in n.users)]
    readers = ir.tensor_readers(gm)
    changed = False
    for node in frontier:
        value = const[node]
        if not isinstance(value, torch.Tensor | int | float | bool):
            continue
        if isinstance(value, torch.Tensor):
            reason = _growth(node, value, const, readers)
            if reason:
                stats.decline("constant_fold", node.name, reason)
                continue
            with gm.graph.inserting_before(node):
                new = ir.const_node(gm.graph, gm, value.detach().clone(), node.name)
            ir.replace(node, new, "cleanup")
        else:
            for user in list(node.users):
                user.args, user.kwargs = fx.map_arg((user.args, user.kwargs), lambda a, n=node, v=value: v if a is n else a)
        stats.match("constant_fold")
        changed = True
    if changed:
        ir.eliminate_dead_code(gm)
        ir.drop_unused_constants(gm)
        gm.recompile()
    return changed


def _growth(node: fx.Node, value: torch.Tensor, const: dict, readers) -> str | None:
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


@register
class Cleanup:
    name = "cleanup"
    exact = True
    description = "remove no-ops (eval dropout, identity, same-dtype casts), fold constant subgraphs, dead code"
    options = ()

    def run(self, program, ctx) -> bool:
        changed = apply_rules(program.gm, [RemoveNoop("remove_noop")], ctx, ctx.stats)
        changed |= fold_constants(program, ctx.stats)
        for node in list(program.gm.graph.nodes):
            # export's dtype/device asserts on a static, verified graph always hold
            if node.target is torch.ops.aten._assert_tensor_metadata.default:
                program.gm.graph.erase_node(node)
                ctx.stats.match("metadata_assert")
                changed = True
        for _ in range(ir.eliminate_dead_code(program.gm)):
            ctx.stats.match("dead_code")
            changed = True
        if changed:
            program.gm.recompile()
        return changed
