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
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from ... import ir
from ...ir.opview import Op, view

# ops that map each element to one element (channel axis kept, nothing to slice)
_UNARY = frozenset({"act", "dropout", "identity", "contiguous", "cast", "neg", "exp", "sqrt", "rsqrt"})


@dataclass(frozen=True)
class Chan:
    """Where a value carries channels: ``axis``; ``parts``, the spaces along the axis in order as
    (space id or None for channels that cannot be pruned, length in indices of the axis);
    ``scale``, indices of the axis per channel."""

    axis: int
    parts: tuple[tuple[int | None, int], ...]
    scale: Fraction = Fraction(1)

    @property
    def size(self) -> int:
        return sum(n for _, n in self.parts)

    def spaces(self) -> list[int]:
        return [s for s, _ in self.parts if s is not None]

    def offsets(self) -> list[tuple[int, int]]:
        """(space, offset in indices) for every part that is a space."""
        out, at = [], 0
        for s, n in self.parts:
            if s is not None:
                out.append((s, at))
            at += n
        return out

    def rescaled(self, axis: int, factor: Fraction) -> Chan | None:
        parts = tuple((s, n * factor) for s, n in self.parts)
        if any(n.denominator != 1 for _, n in parts):
            return None
        return Chan(axis, tuple((s, int(n)) for s, n in parts), self.scale * factor)


@dataclass(frozen=True)
class Edit:
    """One change pruning a space makes at ``node``.

    ``kind`` "tensor": slice the tensor ``ref`` (``("module", attribute)`` of a call_module, or
    ``("const", get_attr node)``) along ``dim``; the space's indices start at ``offset`` and each
    channel covers ``scale`` indices. ``kind`` "literal": shrink a size by (removed channels)·scale:
    ``("shape", k)`` is entry k of a view/reshape size, ``("arg", name, index)`` a named argument
    (or module attribute), entry ``index`` of it when it is a list, ``("split", index, dim)`` the
    sizes of a split along ``dim`` (``index`` None: its one chunk size)."""

    node: fx.Node
    space: int
    kind: str
    ref: tuple
    dim: int = 0
    offset: int = 0
    scale: Fraction = Fraction(1)
    role: str = "through"  # producer | consumer | through | shape


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
class _Layer:
    weight: tuple  # tensor reference (see Edit.ref)
    bias: tuple | None
    w: torch.Tensor  # the weight as stored (addmm stores Wᵀ)
    out_dim: int
    in_dim: int


@dataclass
class Analysis:
    """The result of :func:`analyse`: every group, prunable or not, plus the consumers' inputs."""

    groups: list[Group]
    consumer_inputs: dict[int, list[tuple[fx.Node, Edit, int]]] = field(default_factory=dict)


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _norm_dim(d: Any, rank: int) -> int | None:
    return d + rank if isinstance(d, int) and d < 0 else d if isinstance(d, int) else None


def _rank(node: Any) -> int | None:
    s = ir.shape(node)
    return None if s is None else len(s)


def _name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)) if node.op != "call_module" else str(node.target)


def _is_tuple_value(node: fx.Node) -> bool:
    tm = node.meta.get("tensor_meta", node.meta.get("val"))
    return isinstance(tm, (tuple, list))


class _Analyser:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.g = nx.Graph()
        self.desc: dict[fx.Node, Chan] = {}
        self.tuples: set[fx.Node] = set()
        self.producer: dict[int, fx.Node] = {}
        self.n: dict[int, int] = {}
        self.unit: dict[int, int] = {}
        self.bad: dict[int, str] = {}
        self.edits: list[Edit] = []
        self.carriers: dict[int, set[fx.Node]] = {}
        self.consumer_inputs: dict[int, list[tuple[fx.Node, Edit, int]]] = {}
        self.count_readers: dict[fx.Node, Chan] = {}
        self.label: dict[int, str] = {}  # stable name of a space: producer name, [k] per split into pieces
        self.pieces: dict[fx.Node, list[Chan]] = {}  # splits of the channel axis: the channels of each piece
        self.int_splits: list[tuple[fx.Node, list[Chan]]] = []
        self.handled_readers: set[tuple[fx.Node, fx.Node]] = set()
        self.readers = ir.tensor_readers(gm)

    # -- bookkeeping ----------------------------------------------------------------------------
    def mark_bad(self, chan: Chan | None, reason: str) -> None:
        for s in chan.spaces() if chan is not None else []:
            self.bad.setdefault(s, reason)

    def carry(self, node: fx.Node, chan: Chan) -> None:
        self.desc[node] = chan
        for s in chan.spaces():
            self.carriers[s].add(node)
            if chan.scale < 1:
                u = 1 / chan.scale
                self.unit[s] = math.lcm(self.unit[s], int(u)) if u.denominator == 1 else self.unit[s]
                if u.denominator != 1:
                    self.mark_bad(chan, f"'{node.name}' splits channels into units of {u}")

    def touch(self, node: fx.Node, chan: Chan) -> None:
        for s in chan.spaces():
            self.carriers[s].add(node)

    def union(self, a: Chan, b: Chan, where: fx.Node) -> bool:
        """Couple two values' channels index by index; False (and both marked) when they do not line up."""
        shapes_match = len(a.parts) == len(b.parts) and a.scale == b.scale and all(
            na == nb for (_, na), (_, nb) in zip(a.parts, b.parts, strict=True))
        if not shapes_match:
            reason = f"'{where.name}' combines values whose channels do not line up"
            self.mark_bad(a, reason)
            self.mark_bad(b, reason)
            return False
        for (sa, _), (sb, _) in zip(a.parts, b.parts, strict=True):
            if sa is None and sb is None:
                continue
            if sa is None or sb is None:
                self.mark_bad(a, f"'{where.name}' combines them with channels that cannot be pruned")
                self.mark_bad(b, f"'{where.name}' combines them with channels that cannot be pruned")
                continue
            if self.n[sa] != self.n[sb]:
                self.mark_bad(a, f"'{where.name}' combines spaces of different sizes")
                self.mark_bad(b, f"'{where.name}' combines spaces of different sizes")
                continue
            self.g.add_edge(sa, sb)
        return True

    def tensor_edits(self, node: fx.Node, chan: Chan, ref: tuple, dim: int, role: str = "through") -> list[Edit]:
        out = []
        for s, off in chan.offsets():
            e = Edit(node, s, "tensor", ref, dim, off, chan.scale, role)
            self.edits.append(e)
            out.append(e)
        self.touch(node, chan)
        return out

    def literal_edits(self, node: fx.Node, chan: Chan, ref: tuple, scale: Fraction | None = None) -> None:
        for s, _ in chan.offsets():
            self.edits.append(Edit(node, s, "literal", ref, scale=chan.scale if scale is None else scale, role="shape"))
        self.touch(node, chan)

    def new_space(self, node: fx.Node, n: int) -> int:
        sid = len(self.producer)
        self.producer[sid], self.n[sid], self.unit[sid], self.label[sid] = node, n, 1, node.name
        self.carriers[sid] = {node}
        self.consumer_inputs[sid] = []
        self.g.add_node(sid)
        return sid

    # -- constants --------------------------------------------------------------------------------
    def const_ref(self, op: Op, role: str) -> tuple | None | str:
        """The tensor reference of ``role`` of ``op``: a tuple, None when absent, or why it cannot be sliced."""
        node = op.node
        if node.op == "call_module":
            t = getattr(self.gm.get_submodule(node.target), role, None)
            if t is None:
                return None
            if ir.is_shared(self.gm, t, node, self.readers):
                return f"its {role} is shared with another op (tied)"
            return ("module", role)
        c = op.consts.get(role)
        if c is None:
            return f"its {role} is computed, not a constant"
        if c.tensor is None:
            return None
        t = ir.fetch_attr(self.gm, c.node.target)
        if ir.is_shared(self.gm, t, node, self.readers):
            return f"its {role} is shared with another op (tied)"
        return ("const", c.node)

    def layer(self, op: Op) -> _Layer | str:
        """The weights of a conv/linear as slicable references, or why they are not."""
        w = op.const("weight")
        if w is None:
            return "its weight is computed, not a constant"
        if not w.is_floating_point():
            return f"its weight is {w.dtype}"
        wref = self.const_ref(op, "weight")
        bref = self.const_ref(op, "bias")
        for r in (wref, bref):
            if isinstance(r, str):
                return r
        if wref is None:
            return "it has no weight"
        stored = ir.fetch_attr(self.gm, wref[1].target) if wref[0] == "const" else w
        if op.kind == "linear":
            addmm = op.attrs.get("spelled") == "addmm"
            return _Layer(wref, bref, stored, 1 if addmm else 0, 0 if addmm else 1)
        transposed = bool(op.attrs.get("transposed"))
        return _Layer(wref, bref, stored, 1 if transposed else 0, 0 if transposed else 1)

    # -- the walk ---------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.pieces:
                self.tuple_item(node)
                continue
            for a in node.all_input_nodes:  # the pieces of a split are read through getitem only
                for c in self.pieces.get(a, []):
                    self.mark_bad(c, f"'{node.name}' reads the pieces of '{a.name}' as a whole")
            ins = [a for a in node.all_input_nodes if a in self.desc]
            if node.op == "output":
                for a in ins:
                    self.mark_bad(self.desc[a], f"its channels reach the graph output ('{a.name}')")
                continue
            if ir.is_shape_query(node):
                if ins:
                    self.shape_query(node, ins[0])
                continue
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in self.tuples:
                self.tuple_item(node)
                continue
            op = view(node, self.gm)
            if op is not None and op.kind in ("conv", "linear"):
                self.conv_or_linear(op, ins)
                continue
            if not ins:
                continue
            handler = getattr(self, f"k_{op.kind}", None) if op is not None else None
            if op is not None and op.kind in _UNARY:
                handler = self.k_unary
            if handler is None:
                what = op.kind if op is not None else f"{node.op} {_name(node)}"
                for a in ins:
                    self.mark_bad(self.desc[a], f"'{node.name}' ({what}) reads them in a way pruning does not understand")
                continue
            handler(op, ins)
        for node, pieces in self.int_splits:
            first = pieces[0]
            for p in pieces[1:]:
                same = len(p.parts) == len(first.parts) and all(
                    (a is None) == (b is None) and (a is None or nx.has_path(self.g, a, b))
                    for (a, _), (b, _) in zip(first.parts, p.parts, strict=False))
                if not same:
                    for c in pieces:
                        self.mark_bad(c, f"'{node.name}' splits into chunks of one size, but they are not pruned alike")
        for reader, chan in self.count_readers.items():
            for u in reader.users:
                if (u, reader) not in self.handled_readers:
                    self.mark_bad(chan, f"'{u.name}' uses the channel count read at run time ('{reader.name}')")

    def shape_query(self, node: fx.Node, x: fx.Node) -> None:
        chan, target, rank = self.desc[x], node.target, _rank(x)
        method = target if node.op == "call_method" else None
        attribute = node.args[1] if target is getattr else None
        if method == "dim" or attribute in ("dtype", "device", "ndim"):
            return
        one_dim = (method == "size" and len(node.args) + len(node.kwargs) > 1) or \
            getattr(target, "__name__", "") in ("sym_size", "sym_size.int")
        if one_dim:
            d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if _norm_dim(d, rank) == chan.axis:
                self.count_readers[node] = chan
            return
        if method == "numel":
            if node.users:
                self.mark_bad(chan, f"'{node.name}' reads the element count at run time")
            return
        if method == "size" or attribute == "shape":
            for u in node.users:
                if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
                    if _norm_dim(u.args[1], rank) == chan.axis:
                        self.count_readers[u] = chan
                else:
                    self.mark_bad(chan, f"'{u.name}' uses the whole shape of '{x.name}' at run time")

    def tuple_item(self, node: fx.Node) -> None:
        src = node.args[0]
        if src in self.pieces:
            idx = node.args[1]
            if isinstance(idx, int) and -len(self.pieces[src]) <= idx < len(self.pieces[src]):
                self.carry(node, self.pieces[src][idx])
            else:
                for c in self.pieces[src]:
                    self.mark_bad(c, f"'{node.name}' indexes the pieces of '{src.name}' unreadably")
            return
        chan = self.desc.get(src)
        if chan is None:  # the source was declined: its pieces carry nothing tracked
            return
        src_op = view(src, self.gm)
        if node.args[1] == 0 or (src_op is not None and src_op.kind in ("split", "pool")):
            self.carry(node, chan)
        elif ir.value_users(node):
            self.mark_bad(chan, f"'{node.name}' reads output {node.args[1]} of '{src.name}'")

    # -- producers and consumers --------------------------------------------------------------------
    def conv_or_linear(self, op: Op, ins: list[fx.Node]) -> None:
        node, x = op.node, op.x
        xin = self.desc.get(x) if isinstance(x, fx.Node) else None
        for a in ins:
            if a is not x:
                self.mark_bad(self.desc[a], f"'{node.name}' computes its weights from them")
        layer = self.layer(op)
        why = layer if isinstance(layer, str) else None
        out_rank = _rank(node)
        if op.kind == "linear":
            if xin is not None:
                if why:
                    self.mark_bad(xin, f"consumer '{node.name}': {why}")
                elif xin.axis != _rank(x) - 1 or xin.scale.denominator != 1:
                    self.mark_bad(xin, f"'{node.name}' is a linear over another axis than the channels")
                else:
                    self.consumer(node, x, xin, layer)
            if not why and out_rank:
                self.producer_space(node, layer, out_rank - 1)
            return
        groups = int(op.attrs.get("groups") or 1)
        transposed = bool(op.attrs.get("transposed"))
        if groups == 1:
            if xin is not None:
                if why:
                    self.mark_bad(xin, f"consumer '{node.name}': {why}")
                elif xin.axis != 1 or xin.scale != 1:
                    self.mark_bad(xin, f"'{node.name}' convolves over the channel axis")
                else:
                    self.consumer(node, x, xin, layer)
            if not why and out_rank:
                self.producer_space(node, layer, 1)
            return
        w = op.const("weight")
        c_in = (w.shape[0] if transposed else w.shape[1] * groups) if w is not None else None
        c_out = (w.shape[1] * groups if transposed else w.shape[0]) if w is not None else None
        if xin is None:
            return
        if not (groups == c_in == c_out):
            self.mark_bad(xin, f"grouped convolution '{node.name}' (groups={groups}) couples its channels in groups; "
                               "pruning whole groups is not supported")
            return
        if why or xin.axis != 1 or xin.scale != 1:
            self.mark_bad(xin, f"depthwise convolution '{node.name}': {why or 'channels not on axis 1'}")
            return
        self.tensor_edits(node, xin, layer.weight, 0)
        if layer.bias is not None:
            self.tensor_edits(node, xin, layer.bias, 0)
        self.literal_edits(node, xin, ("arg", "groups", None))
        self.carry(node, xin)

    def consumer(self, node: fx.Node, x: fx.Node, xin: Chan, layer: _Layer) -> None:
        for e in self.tensor_edits(node, xin, layer.weight, layer.in_dim, "consumer"):
            self.consumer_inputs[e.space].append((x, e, xin.axis))

    def producer_space(self, node: fx.Node, layer: _Layer, axis: int) -> None:
        sid = self.new_space(node, int(layer.w.shape[layer.out_dim]))
        chan = Chan(axis, ((sid, self.n[sid]),))
        self.edits.append(Edit(node, sid, "tensor", layer.weight, layer.out_dim, 0, Fraction(1), "producer"))
        if layer.bias is not None:
            self.edits.append(Edit(node, sid, "tensor", layer.bias, 0, 0, Fraction(1), "producer"))
        self.carry(node, chan)

    # -- ops that keep the channels ------------------------------------------------------------------
    def only_x(self, op: Op, ins: list[fx.Node]) -> Chan | None:
        """The channels of the op's data input, marking any other input that carries channels."""
        chan = self.desc.get(op.x) if isinstance(op.x, fx.Node) else None
        for a in ins:
            if a is not op.x:
                self.mark_bad(self.desc[a], f"'{op.node.name}' ({op.kind}) reads them as a parameter")
        if chan is not None and (_rank(op.x) is None or _rank(op.node) is None and op.node not in self.tuples):
            self.mark_bad(chan, f"'{op.node.name}': shapes unknown")
            return None
        return chan

    def k_unary(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is not None:
            if _rank(op.node) != _rank(op.x):
                self.mark_bad(chan, f"'{op.node.name}' changes the rank")
                return
            self.carry(op.node, chan)

    def k_pool(self, op: Op, ins: list[fx.Node]) -> None:
        if op.attrs.get("tuple_out") or _is_tuple_value(op.node):
            self.tuples.add(op.node)
        chan = self.only_x(op, ins)
        if chan is None:
            return
        rank = _rank(op.x)
        nd = op.attrs.get("nd") or rank - 2
        if chan.axis >= rank - nd:
            self.mark_bad(chan, f"'{op.node.name}' ({op.kind}) works over the channel axis")
            return
        self.carry(op.node, chan)

    k_resample = k_pool

    def k_batch_norm(self, op: Op, ins: list[fx.Node]) -> None:
        if op.attrs.get("tuple_out"):
            self.tuples.add(op.node)
        chan = self.only_x(op, ins)
        if chan is None:
            return
        if chan.axis != 1 or chan.scale != 1:
            self.mark_bad(chan, f"BatchNorm '{op.node.name}' normalizes another axis than the channels")
            return
        refs = {role: self.const_ref(op, role) for role in ("weight", "bias", "running_mean", "running_var")}
        bad = next((r for r in refs.values() if isinstance(r, str)), None)
        if bad:
            self.mark_bad(chan, f"BatchNorm '{op.node.name}': {bad}")
            return
        for ref in refs.values():
            if ref is not None:
                self.tensor_edits(op.node, chan, ref, 0)
        if op.node.op == "call_module":
            self.touch(op.node, chan)
        self.carry(op.node, chan)

    def k_layer_norm(self, op: Op, ins: list[fx.Node]) -> None:
        if op.attrs.get("tuple_out"):
            self.tuples.add(op.node)
        chan = self.only_x(op, ins)
        if chan is None:
            return
        rank = _rank(op.x)
        ns = list(op.attrs.get("normalized_shape") or [])
        if chan.axis < rank - len(ns):
            self.carry(op.node, chan)
            return
        if len(ns) != 1:
            self.mark_bad(chan, f"'{op.node.name}' normalizes the channels together with other axes")
            return
        roles = ("weight", "bias") if op.kind == "layer_norm" else ("weight",)
        refs = {role: self.const_ref(op, role) for role in roles}
        bad = next((r for r in refs.values() if isinstance(r, str)), None)
        if bad:
            self.mark_bad(chan, f"'{op.node.name}' ({op.kind}): {bad}")
            return
        for ref in refs.values():
            if ref is not None:
                self.tensor_edits(op.node, chan, ref, 0)
        self.literal_edits(op.node, chan, ("arg", "normalized_shape", -1))
        self.carry(op.node, chan)

    k_rms_norm = k_layer_norm

    def k_group_norm(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        if chan.axis == 1:
            self.mark_bad(chan, f"GroupNorm '{op.node.name}' normalizes groups of channels")
            return
        self.carry(op.node, chan)

    def k_softmax(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        if _norm_dim(op.attrs.get("dim"), _rank(op.x)) == chan.axis:
            self.mark_bad(chan, f"softmax '{op.node.name}' normalizes over the channels")
            return
        self.carry(op.node, chan)

    def k_mean(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        rank = _rank(op.x)
        dims = op.attrs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        dims = [_norm_dim(d, rank) for d in dims]
        if not dims or chan.axis in dims or None in dims:
            self.mark_bad(chan, f"'{op.node.name}' averages over the channels")
            return
        keep = bool(op.attrs.get("keepdim"))
        self.carry(op.node, Chan(chan.axis if keep else chan.axis - sum(d < chan.axis for d in dims), chan.parts, chan.scale))

    def k_transpose(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        rank = _rank(op.x)
        d0, d1 = _norm_dim(op.attrs.get("dim0"), rank), _norm_dim(op.attrs.get("dim1"), rank)
        axis = d1 if chan.axis == d0 else d0 if chan.axis == d1 else chan.axis
        self.carry(op.node, Chan(axis, chan.parts, chan.scale))

    def k_permute(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        rank = _rank(op.x)
        dims = [_norm_dim(d, rank) for d in (op.attrs.get("dims") or [])]
        if chan.axis not in dims:
            self.mark_bad(chan, f"permute '{op.node.name}' has unreadable dims")
            return
        self.carry(op.node, Chan(dims.index(chan.axis), chan.parts, chan.scale))

    def k_reshape(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        node = op.node
        s, t = ir.shape(op.x), ir.shape(node)
        new = reshape_chan(s, t, chan)
        if new is None:
            self.mark_bad(chan, f"'{node.name}' reshapes the channel axis into other axes ({list(s)} → {list(t)})")
            return
        if op.kind == "reshape":
            sizes = shape_args(node)
            if sizes is None or len(sizes) != len(t):
                self.mark_bad(chan, f"'{node.name}': its size arguments cannot be read")
                return
            arg = sizes[new.axis]
            if isinstance(arg, fx.Node):  # replaced by a literal when pruned
                self.handled_readers.add((node, arg))
            if not (isinstance(arg, int) and arg == -1):
                self.literal_edits(node, new, ("shape", new.axis))
        self.carry(node, new)

    k_flatten = k_reshape

    def k_pad(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        pad, rank = list(op.attrs.get("pad") or []), _rank(op.x)
        i = rank - 1 - chan.axis  # pads come in (before, after) pairs, last dim first
        if 2 * i + 1 < len(pad) and (pad[2 * i] != 0 or pad[2 * i + 1] != 0):
            self.mark_bad(chan, f"'{op.node.name}' pads the channels")
            return
        self.carry(op.node, chan)

    def k_slice(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        if _norm_dim(op.attrs.get("dim") or 0, _rank(op.x)) == chan.axis:
            self.mark_bad(chan, f"'{op.node.name}' slices the channels")
            return
        self.carry(op.node, chan)

    def k_unsqueeze(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        d = _norm_dim(op.attrs.get("dim"), _rank(op.node))
        if d is None:
            self.mark_bad(chan, f"'{op.node.name}': unreadable dim")
            return
        self.carry(op.node, Chan(chan.axis + (d <= chan.axis), chan.parts, chan.scale))

    def k_squeeze(self, op: Op, ins: list[fx.Node]) -> None:
        chan = self.only_x(op, ins)
        if chan is None:
            return
        s = ir.shape(op.x)
        dims = op.attrs.get("dim")
        dims = [i for i, v in enumerate(s) if v == 1] if dims is None else [dims] if isinstance(dims, int) else list(dims)
        gone = [d for d in (_norm_dim(d, len(s)) for d in dims) if d is not None and s[d] == 1]
        if chan.axis in gone:
            self.mark_bad(chan, f"'{op.node.name}' squeezes the channel axis")
            return
        self.carry(op.node, Chan(chan.axis - sum(d < chan.axis for d in gone), chan.parts, chan.scale))

    def k_getitem(self, op: Op, ins: list[fx.Node]) -> None:
        """Basic indexing (``x[:, :, 1:]``, ``x[..., None]``) that keeps every channel."""
        chan = self.only_x(op, ins)
        if chan is None:
            return
        index = op.attrs.get("index")
        items = list(index) if isinstance(index, tuple) else [index]
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
            self.mark_bad(chan, f"'{op.node.name}' indexes the tensor with tensors")
            return
        rank = _rank(op.x)
        used = sum(isinstance(i, (int, slice)) for i in items)
        src = dst = 0
        axis = None
        for item in items:
            if item is None:
                dst += 1
            elif item is Ellipsis:
                k = rank - used
                if src <= chan.axis < src + k:
                    axis = dst + chan.axis - src
                src, dst = src + k, dst + k
            elif isinstance(item, int) or item != slice(None):
                if src == chan.axis:
                    self.mark_bad(chan, f"'{op.node.name}' indexes the channels")
                    return
                src, dst = src + 1, dst + (not isinstance(item, int))
            else:
                if src == chan.axis:
                    axis = dst
                src, dst = src + 1, dst + 1
        if axis is None:
            axis = dst + chan.axis - src
        self.carry(op.node, Chan(axis, chan.parts, chan.scale))

    def k_split(self, op: Op, ins: list[fx.Node]) -> None:
        self.tuples.add(op.node)
        chan = self.only_x(op, ins)
        if chan is None:
            return
        rank = _rank(op.x)
        dim = op.attrs.get("dim")
        if _norm_dim(0 if dim is None else dim, rank) != chan.axis:
            self.desc[op.node] = chan
            self.touch(op.node, chan)
            return
        pieces = self.split_channels(op, chan)
        if isinstance(pieces, str):
            self.mark_bad(chan, f"'{op.node.name}' {pieces}")
            return
        self.pieces[op.node] = pieces
        for p in pieces:
            self.touch(op.node, p)

    def split_channels(self, op: Op, chan: Chan) -> list[Chan] | str:
        """The channels of each piece of a split along the channel axis (spaces that the split cuts
        become one space per piece), or why not."""
        size_arg = op.attrs.get("split_size")
        total = chan.size
        metas = op.node.meta.get("tensor_meta")
        if isinstance(size_arg, fx.Node) and isinstance(metas, (list, tuple)) and all(hasattr(m, "shape") for m in metas):
            size_arg = int(metas[0].shape[chan.axis])  # computed at run time (x.shape[-1]): read from the pieces
        if isinstance(size_arg, int):
            if size_arg <= 0 or total % size_arg:
                return "splits the channels into unequal chunks"
            sizes = [size_arg] * (total // size_arg)
        elif isinstance(size_arg, (list, tuple)) and all(isinstance(v, int) for v in size_arg):
            sizes = list(size_arg)
        else:
            return "splits the channels by sizes computed at run time"
        if chan.scale != 1:
            return "splits channels that cover several indices each"
        bounds = [0]
        for v in sizes:
            bounds.append(bounds[-1] + v)
        at = 0
        for space, length in chan.parts:
            inside = [b - at for b in bounds if at < b < at + length]
            if inside and space is not None and (why := self.refine(space, inside)):
                return why
            at += length
        chan = self.desc[op.x]  # refined
        pieces = []
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            parts, at = [], 0
            for space, length in chan.parts:
                a, b = max(lo, at), min(hi, at + length)
                if a < b:
                    parts.append((space, b - a))
                at += length
            pieces.append(Chan(chan.axis, tuple(parts), chan.scale))
        if isinstance(size_arg, int):  # one size for all chunks: they must lose the same channels
            self.int_splits.append((op.node, pieces))
            self.literal_edits(op.node, pieces[0], ("split", None, chan.axis))
        else:
            for i, p in enumerate(pieces):
                self.literal_edits(op.node, p, ("split", i, chan.axis))
        return pieces

    def refine(self, s: int, cuts: list[int]) -> str | None:
        """Split space ``s`` at channel positions ``cuts`` into spaces of its own (a fused q/k/v
        linear read through a split); every record of ``s`` moves to the new spaces."""
        if self.g.degree(s) > 0:
            return "splits channels that are already coupled with others"
        bounds = [0, *cuts, self.n[s]]
        if any(b % self.unit[s] for b in bounds):
            return "splits the channels inside a head"
        kids = []
        for k, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
            c = self.new_space(self.producer[s], hi - lo)
            self.label[c], self.unit[c], self.carriers[c] = f"{self.label[s]}[{k}]", self.unit[s], set(self.carriers[s])
            if s in self.bad:
                self.bad[c] = self.bad[s]
            kids.append((c, lo, hi))

        def moved(e: Edit) -> list[Edit]:
            if e.space != s:
                return [e]
            return [replace(e, space=c, offset=e.offset + int(lo * e.scale)) for c, lo, _ in kids]

        def parts(chan: Chan) -> Chan:
            if s not in chan.spaces():
                return chan
            new: list[tuple[int | None, int]] = []
            for space, length in chan.parts:
                new.extend([(c, int((hi - lo) * chan.scale)) for c, lo, hi in kids] if space == s else [(space, length)])
            return Chan(chan.axis, tuple(new), chan.scale)

        self.edits = [m for e in self.edits for m in moved(e)]
        for c, lo, _ in kids:
            self.consumer_inputs[c] = [(x, replace(e, space=c, offset=e.offset + int(lo * e.scale)), axis)
                                       for x, e, axis in self.consumer_inputs[s]]
        self.desc = {n: parts(c) for n, c in self.desc.items()}
        self.pieces = {n: [parts(c) for c in ps] for n, ps in self.pieces.items()}
        self.count_readers = {n: parts(c) for n, c in self.count_readers.items()}
        self.int_splits = [(n, [parts(c) for c in ps]) for n, ps in self.int_splits]
        self.g.remove_node(s)
        return None

    def k_cat(self, op: Op, ins: list[fx.Node]) -> None:
        node = op.node
        tensors = list(op.x or [])
        rank = _rank(node)
        dim = _norm_dim(op.attrs.get("dim") or 0, rank)
        chans = [self.desc.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        present = [c for c in chans if c is not None]
        if rank is None or any(_rank(t) != rank for t in tensors if isinstance(t, fx.Node)):
            for c in present:
                self.mark_bad(c, f"cat '{node.name}': shapes unknown or of different ranks")
            return
        if any(c.axis != present[0].axis for c in present):
            for c in present:
                self.mark_bad(c, f"cat '{node.name}' joins channels on different axes")
            return
        axis = present[0].axis
        if dim != axis:
            for t, c in zip(tensors, chans, strict=True):
                if c is None:
                    self.mark_bad(present[0], f"cat '{node.name}' joins them with '{getattr(t, 'name', t)}', "
                                              "whose channels cannot be pruned")
                elif c is not present[0]:
                    self.union(present[0], c, node)
            self.carry(node, present[0])
            return
        scale = present[0].scale
        if any(c.scale != scale for c in present):
            for c in present:
                self.mark_bad(c, f"cat '{node.name}' joins channels of different granularity")
            return
        parts: list[tuple[int | None, int]] = []
        for t, c in zip(tensors, chans, strict=True):
            parts.extend(c.parts if c is not None else [(None, ir.shape(t)[dim])])
        self.carry(node, Chan(axis, tuple(parts), scale))

    # -- elementwise combinations ---------------------------------------------------------------------
    def elementwise(self, op: Op, data: list[Any], masks: list[Any]) -> None:
        """``data`` operands combine elementwise into the output; ``masks`` only broadcast against it."""
        node = op.node
        out_rank = _rank(node)
        carrying = [(a, self.desc[a]) for a in data + masks if isinstance(a, fx.Node) and a in self.desc]
        if out_rank is None:
            for _, c in carrying:
                self.mark_bad(c, f"'{node.name}': shapes unknown")
            return
        out_axes = {out_rank - (_rank(a) - c.axis) for a, c in carrying}
        if len(out_axes) != 1:
            for _, c in carrying:
                self.mark_bad(c, f"'{node.name}' combines channels on different axes")
            return
        axis = out_axes.pop()
        first_data = next(((a, c) for a, c in carrying if a in data), None)
        if first_data is None:  # only a mask carries channels
            for _, c in carrying:
                self.mark_bad(c, f"'{node.name}' uses them as a mask")
            return
        ref = first_data[1]
        for a, c in carrying:
            if c is not ref and a in data:
                self.union(ref, c, node)
            elif a in masks:
                self.mark_bad(c, f"'{node.name}' uses them as a mask")
        for a in data + masks:
            if not isinstance(a, fx.Node) or a in self.desc:
                continue
            s = ir.shape(a)
            if s is None:
                continue  # a scalar computed at run time
            idx = axis - (out_rank - len(s))
            size = 1 if idx < 0 else s[idx]
            if size == 1:
                continue
            if a.op == "get_attr" and a in data and size == ref.size:
                t = ir.fetch_attr(self.gm, a.target)
                if ir.is_shared(self.gm, t, node, self.readers) or len(a.users) > 1:
                    self.mark_bad(ref, f"'{node.name}' reads constant '{a.name}', which is shared")
                else:
                    self.tensor_edits(node, ref, ("const", a), idx)
                continue
            self.mark_bad(ref, f"'{node.name}' combines them with '{a.name}', whose channels are not pruned with them")
        self.carry(node, Chan(axis, ref.parts, ref.scale))

    def k_add(self, op: Op, ins: list[fx.Node]) -> None:
        self.elementwise(op, [op.x, op.other], [])

    k_sub = k_mul = k_div = k_pow = k_add

    def k_where(self, op: Op, ins: list[fx.Node]) -> None:
        self.elementwise(op, [op.x, op.other], [op.attrs.get("mask")])

    def k_masked_fill(self, op: Op, ins: list[fx.Node]) -> None:
        self.elementwise(op, [op.x, op.other], [op.attrs.get("mask")])

    def k_matmul(self, op: Op, ins: list[fx.Node]) -> None:
        node, a, b = op.node, op.x, op.other
        ca = self.desc.get(a) if isinstance(a, fx.Node) else None
        cb = self.desc.get(b) if isinstance(b, fx.Node) else None
        ra, rb, ro = _rank(a), _rank(b), _rank(node)
        present = [c for c in (ca, cb) if c is not None]
        if None in (ra, rb, ro) or ra < 2 or rb < 2:
            for c in present:
                self.mark_bad(c, f"matmul '{node.name}' on vectors or unknown shapes")
            return
        out: list[tuple[int, Chan]] = []
        batch: dict[int, Chan] = {}
        for c, r, contracted, kept_axis in ((ca, ra, ra - 1, ra - 2), (cb, rb, rb - 2, rb - 1)):
            if c is None:
                continue
            if c.axis == contracted:
                self.mark_bad(c, f"matmul '{node.name}' contracts over the channels")
                return
            o = ro - (r - c.axis)
            if c.axis == kept_axis:
                out.append((o, c))
            else:
                batch.setdefault(o, c)
                if batch[o] is not c:
                    self.union(batch[o], c, node)
                out.append((o, batch[o]))
        axes = {o for o, _ in out}
        if len(axes) != 1:
            for c in present:
                self.mark_bad(c, f"matmul '{node.name}' puts channels on two axes of its output")
            return
        o = axes.pop()
        if len(present) == 1 and o < ro - 2:  # a batch axis carried by one side only: the other must broadcast
            other = b if ca is not None else a
            s = ir.shape(other)
            idx = o - (ro - len(s))
            if idx >= 0 and s[idx] != 1:
                self.mark_bad(present[0], f"matmul '{node.name}' pairs them with '{other.name}', whose channels are not pruned")
                return
        self.carry(node, out[0][1])

    def k_sdpa(self, op: Op, ins: list[fx.Node]) -> None:
        node = op.node
        q = op.x
        k, v = op.other
        chans = [self.desc.get(t) if isinstance(t, fx.Node) else None for t in (q, k, v)]
        present = [c for c in chans if c is not None]
        mask = op.attrs.get("attn_mask")
        if mask in self.desc:
            self.mark_bad(self.desc[mask], f"attention '{node.name}' uses them as a mask")
        if not present:
            return
        if node.kwargs.get("enable_gqa"):
            for c in present:
                self.mark_bad(c, f"attention '{node.name}' shares key/value heads (GQA)")
            return
        if len(present) != 3:
            for c in present:
                self.mark_bad(c, f"attention '{node.name}' pairs heads with q/k/v whose heads cannot be pruned")
            return
        if any(c.axis != _rank(t) - 3 for c, t in zip(chans, (q, k, v), strict=True)):
            for c in present:
                self.mark_bad(c, f"attention '{node.name}' reads them on another axis than the heads")
            return
        self.union(chans[0], chans[1], node)
        self.union(chans[0], chans[2], node)
        if isinstance(mask, fx.Node) and mask not in self.desc and (s := ir.shape(mask)) is not None:
            idx = len(s) - 3
            if idx >= 0 and s[idx] != 1:
                self.mark_bad(chans[0], f"attention '{node.name}' has a mask per head ('{mask.name}')")
        ro = _rank(node)
        self.carry(node, Chan(ro - 3, chans[2].parts, chans[2].scale))


def reshape_chan(s: tuple | None, t: tuple | None, chan: Chan) -> Chan | None:
    """The channels of ``reshape(x, t)`` when x of shape ``s`` carries ``chan``; None when the reshape
    mixes the channel axis with earlier axes (pruning would not be a slice)."""
    if s is None or t is None:
        return None
    a, size = chan.axis, s[chan.axis]
    before = _prod(s[:a])
    for k in reversed(range(len(t))):
        if _prod(t[:k]) != before:
            continue
        for j in range(a, len(s)):  # the channel axis merged with the input axes a+1..j
            merged = _prod(s[a + 1:j + 1])
            if _prod(s[:j + 1]) == _prod(t[:k + 1]) and t[k] == size * merged:
                return chan.rescaled(k, Fraction(merged))
        for m in range(k + 1, len(t)):  # the channel axis split into output axes k..m
            if _prod(t[:m + 1]) == _prod(s[:a + 1]) and size % t[k] == 0:
                return chan.rescaled(k, Fraction(t[k], size))
    return None


def shape_args(node: fx.Node) -> list[Any] | None:
    """The size arguments of a view/reshape node, one per output dim."""
    if node.op == "call_method":
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            return list(rest[0])
        return rest or list(node.kwargs.get("shape", node.kwargs.get("size", [])) or []) or None
    args = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape", node.kwargs.get("size"))
    return list(args) if isinstance(args, (list, tuple)) else None


def set_shape_arg(node: fx.Node, k: int, value: int) -> None:
    """Set entry ``k`` of a view/reshape node's size arguments."""
    if node.op == "call_method":
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            sizes = list(rest[0])
            sizes[k] = value
            node.args = (node.args[0], type(rest[0])(sizes))
        else:
            rest[k] = value
            node.args = (node.args[0], *rest)
        return
    if len(node.args) > 1:
        sizes = list(node.args[1])
        sizes[k] = value
        node.args = (node.args[0], sizes, *node.args[2:])
    else:
        key = "shape" if "shape" in node.kwargs else "size"
        sizes = list(node.kwargs[key])
        sizes[k] = value
        node.kwargs = {**node.kwargs, key: sizes}


def analyse(gm: fx.GraphModule) -> Analysis:
    """Every channel group of ``gm`` (shapes must be annotated), prunable or with the reason it is not."""
    an = _Analyser(gm)
    an.run()
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = []
    for comp in nx.connected_components(an.g):
        spaces = sorted(comp)
        spaces.sort(key=lambda s: (order[an.producer[s]], an.label[s]))
        producers = sorted({an.producer[s] for s in spaces}, key=order.__getitem__)
        reason = next((an.bad[s] for s in spaces if s in an.bad), None)
        ns = {an.n[s] for s in spaces}
        if len(ns) != 1:
            reason = reason or "coupled spaces differ in size"
        unit = math.lcm(*(an.unit[s] for s in spaces))
        n = max(ns)
        if reason is None and n % unit:
            reason = f"{n} channels are not whole units of {unit}"
        nodes: set[fx.Node] = set()
        for s in spaces:
            nodes |= an.carriers[s]
        edits = [e for e in an.edits if e.space in comp]
        nodes |= {e.node for e in edits}
        groups.append(Group(tuple(an.label[s] for s in spaces), n, unit, spaces, producers, edits,
                            sorted(nodes, key=order.__getitem__), reason))
    groups.sort(key=lambda g: order[g.producers[0]])
    return Analysis(groups, an.consumer_inputs)
