"""Timing the nodes a group computes on, before and after pruning it, at their recorded inputs.

The nodes become a module of the values entering them (:func:`region_module`); both modules are
timed together (``optic.pipeline.timing.compare``). Regions of equal structure and shapes are
timed once (:func:`signature` keys the cache).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from optic import ir
from optic.pipeline import timing


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


def signature(gm: fx.GraphModule, names: set[str]) -> str:
    """What the nodes ``names`` compute and on which shapes: equal signatures time alike."""
    parts = []
    for n in gm.graph.nodes:
        if n.name not in names:
            continue
        args = [ir.shape(a) if isinstance(a, fx.Node) else a for a in n.args]
        what = repr(gm.get_submodule(n.target)) if n.op == "call_module" else getattr(n.target, "__name__", n.target)
        parts.append(f"{n.op}:{what}:{args}:{ir.shape(n)}")
    return "|".join(parts)


def time_region(before: fx.GraphModule, after: fx.GraphModule, names: set[str], outside: dict[str, Any],
                budget_s: float, cache: dict) -> tuple[float, float]:
    """Median seconds of the nodes ``names`` in ``before`` and in ``after``, fed the recorded values
    ``outside`` (by name) of what enters them."""
    key = (signature(before, names), signature(after, names))
    if key not in cache:
        m0, in0 = region_module(before, names)
        m1, in1 = region_module(after, names)
        a0, a1 = [outside[n] for n in in0], [outside[n] for n in in1]
        fns = {"before": lambda: m0(*a0), "after": lambda: m1(*a1)}
        block = timing.calls_per_block(fns["before"], target_s=0.01, cap=50)
        t = timing.compare(fns, rounds=7, block=block, warmup=1, budget_s=budget_s)
        cache[key] = (t["before"].median, t["after"].median)
    return cache[key]
