"""Where exits can go: block boundaries of the graph, and the few cuts chosen among them.

A *block boundary* is a stream node ``v`` (:func:`~optic.passes.early_exit.runner.side_nodes`) such that

- ``v`` dominates the output in the DAG of the model's data flow (networkx): every path from the
  inputs to the logits passes through it;
- ``v`` is then the only stream value live across the cut after it (side values, e.g. attention
  masks, may cross too: the runner passes them along);
- the output does not read ``v`` itself, and ``v`` is not merely finished by its one reader: a cut
  right before a norm/activation that only finishes ``v`` moves behind it.

Each boundary has the share of the model's predicted cost on the target spent up to it
(``cost.node_seconds``). :func:`choose_cuts` takes up to ``count`` of them, nearest to
``i/(count+1)`` of that cost; it declines, by node, a boundary whose feature a head cannot read
(2-D/3-D/4-D float) or that comes too late to skip anything worth it.

The cut search is a dominator analysis, not a walk over the op view: a boundary can be an op the
view does not know (``nn.TransformerEncoderLayer``, ``nn.Embedding``), which ``find_sites`` skips.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from optic.ir.graph import dtype as dtype_of
from optic.ir.graph import shape as shape_of
from optic.ir.graph import value_users
from optic.ir.opview import kind_of
from optic.pipeline import cost

from .runner import assign, side_nodes

RULE = "early_exit"
LATEST = 0.9  # a cut with more of the predicted cost before it leaves too little to skip
# ops that only finish the value they read: a cut goes behind them
_FINISHING = frozenset({"batch_norm", "layer_norm", "rms_norm", "group_norm", "act", "dropout", "identity", "cast",
                        "contiguous"})
_SOURCE, _OUTPUT = "<source>", "<output>"  # the DAG's entry and exit (never node names: fx names are identifiers)


@dataclass
class Cut:
    node: str
    module: str  # the module the node belongs to ('' for the model's own forward)
    shape: tuple[int, ...] | None
    fraction: float  # predicted share of the model's cost spent up to and including this cut


# -- block boundaries --------------------------------------------------------------------------------
def block_boundaries(gm: fx.GraphModule) -> list[str]:
    """Stream nodes after which the graph can be cut (see the module docstring), in graph order."""
    side = side_nodes(gm)
    order = list(gm.graph.nodes)
    stream = [n for n in order if n not in side and n.op != "output"]
    dag = _stream_dag(order, stream, side)
    if dag is None:
        return []
    live = _live_stream_values(order, stream)
    by_name = {n.name: n for n in order}
    pos = {n: i for i, n in enumerate(order)}
    return [name for name in _dominators_of_output(dag)
            if _is_boundary(by_name[name], live[pos[by_name[name]]], side, gm)]


def _stream_dag(order: list[fx.Node], stream: list[fx.Node], side: set[fx.Node]) -> nx.DiGraph | None:
    """The data flow between stream nodes, from one source to one output, restricted to what reaches
    the output (asserts carry nothing on); None when no stream value reaches the output."""
    out = order[-1] if order[-1].op == "output" else next(n for n in order if n.op == "output")
    dag = nx.DiGraph()
    dag.add_node(_SOURCE)
    for n in stream:
        preds = [a for a in n.all_input_nodes if a not in side]
        dag.add_edges_from((a.name, n.name) for a in preds)
        if not preds:
            dag.add_edge(_SOURCE, n.name)
    dag.add_edges_from((a.name, _OUTPUT) for a in out.all_input_nodes if a not in side)
    if _OUTPUT not in dag:
        return None
    return dag.subgraph(nx.ancestors(dag, _OUTPUT) | {_OUTPUT})


def _dominators_of_output(dag: nx.DiGraph) -> list[str]:
    """The nodes every path from the source to the output passes through, source side first."""
    idom = nx.immediate_dominators(dag, _SOURCE)
    chain = []
    v = idom[_OUTPUT]
    while v != _SOURCE:
        chain.append(v)
        v = idom[v]
    return chain[::-1]


def _live_stream_values(order: list[fx.Node], stream: list[fx.Node]) -> list[int]:
    """Per graph position, how many stream values are live after it (a difference array)."""
    pos = {n: i for i, n in enumerate(order)}
    live = [0] * (len(order) + 1)
    for n in stream:
        if n.users:
            live[pos[n]] += 1
            live[max(pos[u] for u in n.users)] -= 1
    return list(itertools.accumulate(live))


def _is_boundary(v: fx.Node, live: int, side: set[fx.Node], gm: fx.GraphModule) -> bool:
    """Whether the graph can be cut after ``v``, a dominator of the output with ``live`` stream values
    crossing the cut after it."""
    if live != 1 or any(u.op == "output" for u in v.users):
        return False
    users = value_users(v)
    finished_behind = (len(users) == 1 and kind_of(users[0], gm) in _FINISHING
                       and [a for a in users[0].all_input_nodes if a not in side] == [v])
    return not finished_behind


# -- their cost --------------------------------------------------------------------------------------
def segment_seconds(gm: fx.GraphModule, cuts: list[str], target: Any) -> list[float]:
    """Predicted seconds of each segment when ``gm`` is cut after ``cuts`` (cost.node_seconds)."""
    seconds = [0.0] * (len(cuts) + 1)
    for n, k in assign(gm, cuts).items():
        seconds[k] += cost.node_seconds(n, gm, target)
    return seconds


def exit_candidates(program: Any, target: Any) -> list[Cut]:
    """Every block boundary of ``program`` with its feature shape and share of the predicted cost."""
    gm = program.gm
    names = block_boundaries(gm)
    if not names:
        return []
    seconds = segment_seconds(gm, names, target)
    total = sum(seconds) or 1.0
    by_name = {n.name: n for n in gm.graph.nodes}
    cum = list(itertools.accumulate(seconds))
    return [Cut(name, _module_path(by_name[name]), shape_of(by_name[name]), cum[i] / total)
            for i, name in enumerate(names)]


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


# -- the choice --------------------------------------------------------------------------------------
def feature_ok(node: fx.Node) -> str | None:
    """Why a head cannot read this node's value, or None."""
    s, dt = shape_of(node), dtype_of(node)
    # uint8: an int8 kernel's quantized output, read as the numbers it holds (an affine map of the values, which
    # the head's standardization and linear absorb)
    if s is None or dt is None or not (dt.is_floating_point or dt == torch.uint8) or len(s) not in (2, 3, 4):
        return (f"feature is {list(s) if s else 'not a tensor'} {str(dt).replace('torch.', '')}: heads read 2-D/3-D/4-D "
                "float or uint8")
    return None


def cut_declines(cut: Cut, node: fx.Node, latest: float = LATEST) -> str | None:
    """The guard of a candidate cut: why no exit goes there, or None."""
    why = feature_ok(node)
    if why is None and cut.fraction > latest:
        why = f"{cut.fraction:.0%} of the predicted cost is before it: too little left to skip"
    return why


def choose_cuts(program: Any, cands: list[Cut], count: int, stats: Any = None, latest: float = LATEST) -> list[Cut]:
    """Up to ``count`` cuts spread over the predicted cost: the nearest to ``i/(count+1)`` each, among
    the candidates the guard passes (each one it declines is recorded in ``stats`` by its node)."""
    by_name = {n.name: n for n in program.gm.graph.nodes}
    usable = []
    for c in cands:
        why = cut_declines(c, by_name[c.node], latest)
        if why is None:
            usable.append(c)
        elif stats is not None:
            stats.decline(RULE, c.node, why)
    chosen: list[Cut] = []
    for i in range(1, count + 1):
        left = [c for c in usable if c not in chosen]
        if left:
            chosen.append(min(left, key=lambda c: abs(c.fraction - i / (count + 1))))
    return sorted(chosen, key=lambda c: c.fraction)
