"""Partitioning a graph between two executors: groups of accepted ops that can each run as one call.

A group must be convex (no path leaves it and comes back), or it could not run as one call with
the other executor's ops before and after it. The rule that guarantees it:

    depth(n) = max over n's op inputs i of depth(i) + [i is declined]        (0 without inputs)

The accepted ops of one depth form one group. Every edge keeps or raises the depth and leaving a
declined op raises it, so every op on a path between two ops of one depth is an accepted op of that
depth: the group is convex. (Depths are then raised as far as the users allow, so that an op on
constants alone, such as a weight's transpose, lands with the op that reads it.) ``cut`` gives ops a
second key that splits a depth further, into the connected pieces of each key (bisection uses it
when two halves work apart but not together).

:func:`extract` makes one group a GraphModule of its own: external values become placeholders,
constants (``get_attr``) that only the group reads move into it, and every value read outside the
group (or returned) is an output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch.fx as fx

OPS = ("call_function", "call_method", "call_module")


def convex_groups(graph: fx.Graph, accepted: Callable[[fx.Node], bool],
                  cut: Mapping[fx.Node, int] | None = None) -> list[list[fx.Node]]:
    """Groups of accepted op nodes, each convex, in graph order (nodes in each group in graph order)."""
    import networkx as nx  # loaded when a graph is partitioned, not with optic

    cut = cut or {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    ops = [n for n in graph.nodes if n.op in OPS]
    depth: dict[fx.Node, int] = {}
    for n in ops:  # graph order is a topological order
        depth[n] = max((depth[i] + (not accepted(i)) for i in n.all_input_nodes if i in depth), default=0)
    for n in reversed(ops):  # as late as possible: a weight's transpose joins the matmul that reads it
        users = [depth[u] for u in n.users if u in depth]
        if accepted(n) and users:
            depth[n] = max(depth[n], min(users))
    key = {n: (depth[n], cut.get(n, 0)) for n in ops if accepted(n)}
    salted = {d for n, (d, salt) in key.items() if salt}
    joined = nx.Graph()
    joined.add_nodes_from(key)
    joined.add_edges_from((i, n) for n in key for i in n.all_input_nodes if i in key and key[i] == key[n])
    groups = [set(c) for c in nx.connected_components(joined)]
    # Unconnected groups of one depth merge (a path between them would cross a declined op and
    # come back at a smaller depth), unless a cut splits that depth.
    merged: dict[int, set[fx.Node]] = {}
    for g in groups:
        d = key[next(iter(g))][0]
        if d not in salted:
            merged.setdefault(d, set()).update(g)
    groups = [g for g in groups if key[next(iter(g))][0] in salted] + list(merged.values())
    groups = [sorted(g, key=order.__getitem__) for g in groups]
    groups.sort(key=lambda g: order[g[0]])
    assert _acyclic(ops, groups), "partition groups form a cycle"
    return groups


def _acyclic(ops: list[fx.Node], groups: list[list[fx.Node]]) -> bool:
    import networkx as nx

    where = {n: ("group", i) for i, g in enumerate(groups) for n in g}
    condensed = nx.DiGraph()
    for n in ops:
        a = where.get(n, n)
        condensed.add_node(a)
        for i in n.all_input_nodes:
            if i.op in OPS and where.get(i, i) != a:
                condensed.add_edge(where.get(i, i), a)
    return nx.is_directed_acyclic_graph(condensed)


@dataclass
class Subgraph:
    """One group as a GraphModule: ``gm(*values of inputs) == tuple(values of outputs)``."""

    gm: fx.GraphModule
    nodes: list[fx.Node]  # the group's op nodes and the constants it took with it, in graph order
    inputs: list[fx.Node]  # nodes of the whole graph whose values the group reads
    outputs: list[fx.Node]  # nodes of the group whose values are read outside it


def extract(gm: fx.GraphModule, group: Iterable[fx.Node]) -> Subgraph:
    """The GraphModule that computes ``group`` (op nodes of ``gm``) from its inputs; shares constants."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ops = set(group)
    consts = {i for n in ops for i in n.all_input_nodes if i.op == "get_attr" and set(i.users) <= ops}
    members = sorted(ops | consts, key=order.__getitem__)
    inside = set(members)
    inputs = sorted({i for n in members for i in n.all_input_nodes if i not in inside}, key=order.__getitem__)
    outputs = [n for n in members if n.op in OPS and any(u not in inside for u in n.users)]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i in inputs:
        env[i] = graph.placeholder(i.name)
        env[i].meta = dict(i.meta)
    for n in members:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output(tuple(env[o] for o in outputs))
    return Subgraph(fx.GraphModule(gm, graph), members, inputs, outputs)
