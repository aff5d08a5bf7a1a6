"""Coupled channels: which output channels of which layers must be pruned together, and what else
changes with them. The analysis behind structured pruning.

A *space* is the output channels of one producer: a conv (dim 1 of its output) or a linear (last
dim) whose weights are constants nobody else reads. A value carries channels as a :class:`Chan`:
its channel axis, the spaces laid out along it (a ``cat`` lays several side by side; ``None`` marks
channels that cannot be pruned) and how many indices of the axis one channel covers (after
``flatten`` of ``[N, C, H, W]`` channel c is features c·H·W … (c+1)·H·W−1; after splitting a linear's
output into attention heads one index of the head axis covers D channels).

Channels flow forward from producers through ops that keep their axis (activations, dropout,
casts, BatchNorm, depthwise convs, pooling, resampling, padding, slicing and indexing of other
axes, elementwise ops with scalars or constants, reductions over other axes, transposes,
(un)squeezes, and reshapes that merge the channel axis with later axes or split it into heads) to
consumers (conv input channels, linear input features, LayerNorm over the channel axis). Values
combined elementwise (residual ``add``, gating ``mul``), the q/k/v of attention (SDPA or
matmul/softmax) and the batch axes of a ``matmul`` couple their spaces: channel c of one is channel c
of the other. ``cat`` along the channel axis lays spaces side by side; a ``split`` along it (a fused
q/k/v projection) cuts its producer's space into one space per piece. A *group* is a connected
component of coupled spaces (networkx): one index set K of kept channels applies to every space in it.

What each kind of op does is one entry of the transfer table (``optic.passes.prune.transfer``);
this module walks the graph once in order, hands every op to its entry, and handles what is no op
kind: the graph output, tuple items, and shape queries that read a channel count at run time.

A group cannot be pruned, and says why, when its channels reach the graph output, meet a value
whose channels are fixed (a graph input, a grouped conv, GQA's repeated key/value heads), or reach
an op the analysis does not understand on their axis (indexing them, ops the op view does not
classify such as ``roll`` or in-place ``add_``, reshapes that merge them with earlier axes, softmax
or a reduction over them, a matmul contracting them, tied weights, ...).

:class:`Edit` records each change pruning makes, per space: slice a tensor along a dim (producer
rows, consumer columns, BatchNorm statistics, a constant operand) or shrink a size literal (view
sizes, LayerNorm's normalized_shape, a depthwise conv's groups). Nodes keep their names when
pruned, so the analysis can be re-run on a pruned program and finds the same groups.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from ... import ir
from ...ir.opview import view
from .spaces import Chan, Edit, Spaces, norm_dim, rank
from .transfer import PRODUCERS, TRANSFER, not_understood

__all__ = ["Analysis", "Chan", "Edit", "Group", "analyse"]


@dataclass
class Group:
    """Coupled spaces, pruned with one index set of ``n`` channels (in whole ``unit`` s)."""

    key: tuple[str, ...]  # its spaces' labels (producer names, [k] for pieces of a split): stable across pruning
    n: int
    unit: int
    spaces: list[int]
    producers: list[fx.Node]
    edits: list[Edit]
    nodes: list[fx.Node]  # every node that computes on or changes with these channels, in graph order
    reason: str | None = None


@dataclass
class Analysis:
    """The result of :func:`analyse`: every group, prunable or not, plus the consumers' inputs."""

    groups: list[Group]
    consumer_inputs: dict[int, list[tuple[fx.Node, Edit, int]]] = field(default_factory=dict)


def analyse(gm: fx.GraphModule) -> Analysis:
    """Every channel group of ``gm`` (shapes must be annotated), prunable or with the reason it is not."""
    sp = Spaces(gm)
    for node in gm.graph.nodes:
        _visit(sp, node)
    _check_equal_chunks(sp)
    _check_count_readers(sp)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = [_group(sp, comp, order) for comp in nx.connected_components(sp.g)]
    groups.sort(key=lambda g: order[g.producers[0]])
    return Analysis(groups, sp.consumer_inputs)


# -- the walk ---------------------------------------------------------------------------------------------
def _visit(sp: Spaces, node: fx.Node) -> None:
    """What ``node`` does with the channels of its inputs."""
    if node.op in ("placeholder", "get_attr"):
        return
    if _is_item(node) and node.args[0] in sp.pieces:
        _tuple_item(sp, node)
        return
    for a in node.all_input_nodes:  # the pieces of a split are read through getitem only
        for c in sp.pieces.get(a, []):
            sp.mark_bad(c, f"'{node.name}' reads the pieces of '{a.name}' as a whole")
    ins = [a for a in node.all_input_nodes if a in sp.desc]
    if node.op == "output":
        for a in ins:
            sp.mark_bad(sp.desc[a], f"its channels reach the graph output ('{a.name}')")
        return
    if ir.is_shape_query(node):
        if ins:
            _shape_query(sp, node, ins[0])
        return
    if _is_item(node) and node.args[0] in sp.tuples:
        _tuple_item(sp, node)
        return
    op = view(node, sp.gm)
    transfer = TRANSFER.get(op.kind) if op is not None else None
    if transfer is None:
        if ins:
            not_understood(sp, node, op, ins)
    elif ins or op.kind in PRODUCERS:
        transfer(sp, op, ins)


def _is_item(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def _tuple_item(sp: Spaces, node: fx.Node) -> None:
    """An item of a split along the channels (its piece), or of an op returning a tuple (item 0,
    every piece of a split along another axis or of a pooling op, carries the input's channels)."""
    src = node.args[0]
    if src in sp.pieces:
        idx = node.args[1]
        if isinstance(idx, int) and -len(sp.pieces[src]) <= idx < len(sp.pieces[src]):
            sp.carry(node, sp.pieces[src][idx])
        else:
            for c in sp.pieces[src]:
                sp.mark_bad(c, f"'{node.name}' indexes the pieces of '{src.name}' unreadably")
        return
    chan = sp.desc.get(src)
    if chan is None:  # the source was declined: its pieces carry nothing tracked
        return
    src_op = view(src, sp.gm)
    if node.args[1] == 0 or (src_op is not None and src_op.kind in ("split", "pool")):
        sp.carry(node, chan)
    elif ir.value_users(node):
        sp.mark_bad(chan, f"'{node.name}' reads output {node.args[1]} of '{src.name}'")


def _shape_query(sp: Spaces, node: fx.Node, x: fx.Node) -> None:
    """``x.size(c)``, ``x.shape[c]`` of the channel axis: a count that changes with pruning, fine where
    a reshape reads it (it becomes a literal); the whole shape or the element count declines."""
    chan, target, r = sp.desc[x], node.target, rank(x)
    method = target if node.op == "call_method" else None
    attribute = node.args[1] if target is getattr else None
    if method == "dim" or attribute in ("dtype", "device", "ndim"):
        return
    one_dim = (method == "size" and len(node.args) + len(node.kwargs) > 1) or \
        getattr(target, "__name__", "") in ("sym_size", "sym_size.int")
    if one_dim:
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if norm_dim(d, r) == chan.axis:
            sp.count_readers[node] = chan
        return
    if method == "numel":
        if node.users:
            sp.mark_bad(chan, f"'{node.name}' reads the element count at run time")
        return
    if method == "size" or attribute == "shape":
        for u in node.users:
            if _is_item(u) and isinstance(u.args[1], int):
                if norm_dim(u.args[1], r) == chan.axis:
                    sp.count_readers[u] = chan
            else:
                sp.mark_bad(chan, f"'{u.name}' uses the whole shape of '{x.name}' at run time")


# -- checks after the walk -------------------------------------------------------------------------------
def _check_equal_chunks(sp: Spaces) -> None:
    """A split by one chunk size keeps its chunks equal: their spaces must be pruned alike."""
    for node, pieces in sp.int_splits:
        first = pieces[0]
        for p in pieces[1:]:
            same = len(p.parts) == len(first.parts) and all(
                (a is None) == (b is None) and (a is None or nx.has_path(sp.g, a, b))
                for (a, _), (b, _) in zip(first.parts, p.parts, strict=False))
            if not same:
                for c in pieces:
                    sp.mark_bad(c, f"'{node.name}' splits into chunks of one size, but they are not pruned alike")


def _check_count_readers(sp: Spaces) -> None:
    """A channel count read at run time may only feed the reshapes that take it as their size."""
    for reader, chan in sp.count_readers.items():
        for u in reader.users:
            if (u, reader) not in sp.handled_readers:
                sp.mark_bad(chan, f"'{u.name}' uses the channel count read at run time ('{reader.name}')")


def _group(sp: Spaces, comp: set[int], order: dict[fx.Node, int]) -> Group:
    """The group of the coupled spaces ``comp``, with the first reason any of them cannot be pruned."""
    spaces = sorted(comp)
    spaces.sort(key=lambda s: (order[sp.producer[s]], sp.label[s]))
    producers = sorted({sp.producer[s] for s in spaces}, key=order.__getitem__)
    reason = next((sp.bad[s] for s in spaces if s in sp.bad), None)
    ns = {sp.n[s] for s in spaces}
    if len(ns) != 1:
        reason = reason or "coupled spaces differ in size"
    unit = math.lcm(*(sp.unit[s] for s in spaces))
    n = max(ns)
    if reason is None and n % unit:
        reason = f"{n} channels are not whole units of {unit}"
    nodes: set[fx.Node] = set()
    for s in spaces:
        nodes |= sp.carriers[s]
    edits = [e for e in sp.edits if e.space in comp]
    nodes |= {e.node for e in edits}
    return Group(tuple(sp.label[s] for s in spaces), n, unit, spaces, producers, edits,
                 sorted(nodes, key=order.__getitem__), reason)
