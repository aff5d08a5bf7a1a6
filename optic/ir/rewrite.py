"""Rules and the one driver that applies them.

A rule is three small functions over the op view:

- ``match(op, ctx)`` returns a match (any object) when the rule's pattern is here, else None;
- ``guard(m, ctx)`` returns None when the rewrite is legal, else the reason it declines;
- ``apply(m, ctx)`` does the surgery (through ``optic.ir`` helpers).

``apply_rules`` walks the graph, applies rules to a fixed point, removes dead code, lints, and
counts every match and every decline with its reason into the pass record. Passes never loop
over nodes themselves.

Passes that choose before they rewrite (the lossy passes propose actions to the budget's allocator,
the backend times kernels first) use :class:`Site` rules with :func:`find_sites`: the same walk
and guards, every decline recorded with its node, the matches returned instead of rewritten. A
decline that concerns the whole model, not one node, names :data:`MODEL`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from .graph import drop_unused_constants, eliminate_dead_code
from .opview import Op, view


@dataclass
class Rule:
    """One rewrite: a pattern (``match``), a legality check (``guard``) and the surgery (``apply``).

    The driver shows a rule the ops the op view knows. A rule about calls the op view does not classify
    (optic's own int8 kernels, export's metadata asserts) names their functions in ``targets``: the
    driver shows it those calls as ops of kind :data:`OPAQUE` (``op.node`` is the call)."""

    name: str
    targets: frozenset[Any] = field(default=frozenset(), kw_only=True)

    def match(self, op: Op, ctx: Any) -> Any | None:  # pragma: no cover - interface
        raise NotImplementedError

    def guard(self, m: Any, ctx: Any) -> str | None:
        return None

    def apply(self, m: Any, ctx: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class RuleStats:
    matched: dict[str, int] = field(default_factory=dict)
    declined: dict[tuple[str, str, str], None] = field(default_factory=dict)  # (rule, node, reason), ordered

    def match(self, rule: str) -> None:
        self.matched[rule] = self.matched.get(rule, 0) + 1

    def decline(self, rule: str, node: str, reason: str) -> None:
        self.declined[(rule, node, reason)] = None


class Several(tuple):
    """What a :class:`Site` rule's ``match`` returns when one op is the place of several sites (a linear
    whose output is split into pieces pruned apart): :func:`find_sites` guards each and keeps the legal
    ones, in this order."""


MODEL = "<model>"  # the node name of a decline about the whole model (no single node is to blame)
OPAQUE = "opaque"  # the kind of a call the op view does not classify, shown to rules that name its target


@dataclass
class Site(Rule):
    """A rule that finds where a pass could act: ops of ``kinds`` (any kind when empty) that pass the
    guard. ``match`` may be overridden for patterns wider than one op."""

    kinds: frozenset[str] = frozenset()

    def match(self, op: Op, ctx: Any) -> Any | None:
        if op.kind == OPAQUE:  # the driver shows one only to a rule that names its target
            return op
        return op if not self.kinds or op.kind in self.kinds else None

    def apply(self, m: Any, ctx: Any) -> None:  # sites are collected, not rewritten
        raise TypeError(f"{self.name}: a Site is found with find_sites, not applied")


def _first_legal(gm: fx.GraphModule, rules: list[Rule], ctx: Any, declined: dict[tuple[str, str, str], None]):
    """Walk ``gm`` in graph order; per op, yield (node, rule, match) for the first rule that matches and
    whose guard passes, recording (rule, node, reason) in ``declined`` for each guard that refuses.
    The caller may rewrite the graph between steps (nodes erased meanwhile are skipped)."""
    opaque = frozenset().union(*(r.targets for r in rules))
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):
            continue
        op = view(node, gm)
        if op is None:
            if node.op != "call_function" or node.target not in opaque:
                continue
            op = Op(kind=OPAQUE, node=node, x=node.args[0] if node.args else None)
        for rule in rules:
            if op.kind == OPAQUE and node.target not in rule.targets:
                continue
            m = rule.match(op, ctx)
            if m is None:
                continue
            legal = []
            for one in m if isinstance(m, Several) else (m,):
                reason = rule.guard(one, ctx)
                if reason is not None:
                    declined[(rule.name, node.name, reason)] = None
                else:
                    legal.append(one)
            if not legal:
                continue
            yield node, rule, Several(legal) if isinstance(m, Several) else legal[0]
            break


def find_sites(gm: fx.GraphModule, rules: Rule | list[Rule], ctx: Any, stats: RuleStats) -> list[Any]:
    """One walk over ``gm`` in graph order: per op, the first rule that matches and whose guard passes
    gives a site (its match); a guard's reason is recorded as a decline of that node. The graph is
    not changed; a site is counted as a match by the pass when it acts on it."""
    declined: dict[tuple[str, str, str], None] = {}
    sites = [one for _, _, m in _first_legal(gm, [rules] if isinstance(rules, Rule) else list(rules), ctx, declined)
             for one in (m if isinstance(m, Several) else (m,))]
    for key in declined:
        stats.decline(*key)
    return sites


def apply_rules(gm: fx.GraphModule, rules: list[Rule], ctx: Any, stats: RuleStats, max_sweeps: int = 20) -> bool:
    """Apply ``rules`` until none fires; return whether the graph changed."""
    changed = False
    declined: dict[tuple[str, str, str], None] = {}
    fired_at: set[tuple[str, str]] = set()
    for _ in range(max_sweeps):
        fired = False
        for node, rule, m in _first_legal(gm, rules, ctx, declined):
            rule.apply(m, ctx)
            stats.match(rule.name)
            fired_at.add((rule.name, node.name))
            fired = True
        if not fired:
            break
        changed = True
        eliminate_dead_code(gm)
        gm.graph.lint()
    for key in declined:  # a decline that a later sweep overcame is no miss
        if key[:2] not in fired_at:
            stats.decline(*key)
    if changed:
        eliminate_dead_code(gm)
        drop_unused_constants(gm)
        gm.recompile()
    return changed

