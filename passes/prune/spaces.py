"""The state of the channel analysis: spaces, the values that carry them, their couplings and edits.

A *space* is the output channels of one producer (a conv or a linear). A value carries channels as
a :class:`Chan`; two spaces are coupled (an edge of a networkx graph) when channel c of one must go
with channel c of the other; an :class:`Edit` is one change that pruning a space makes at a node.
A space that cannot be pruned is marked with the first reason found. The transfer functions
(``optic.passes.prune.transfer``) change this state only through the methods of :class:`Spaces`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from ... import ir
from ...ir.opview import Op


def rank(node: Any) -> int | None:
    """The number of dims of a value, None when its shape was not recorded."""
    s = ir.shape(node)
    return None if s is None else len(s)


def norm_dim(d: Any, rank: int | None) -> int | None:
    """``d`` counted from the front (None when it is not an int)."""
    return d + rank if isinstance(d, int) and d < 0 else d if isinstance(d, int) else None


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

    def moved(self, axis: int) -> Chan:
        """The same channels on another axis."""
        return Chan(axis, self.parts, self.scale)

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

    def tensor(self, gm: fx.GraphModule) -> torch.Tensor:
        """The tensor a "tensor" edit slices, as ``gm`` holds it now."""
        if self.ref[0] == "module":
            return getattr(gm.get_submodule(self.node.target), self.ref[1])
        return ir.fetch_attr(gm, self.ref[1].target)


@dataclass
class Layer:
    """The weights of a conv or linear as slicable references (see :attr:`Edit.ref`)."""

    weight: tuple
    bias: tuple | None
    w: torch.Tensor  # the weight as stored (addmm stores Wᵀ)
    out_dim: int
    in_dim: int


class Spaces:
    """Everything the analysis has found so far about the channels of ``gm``."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.g = nx.Graph()  # spaces, coupled by edges
        self.desc: dict[fx.Node, Chan] = {}  # the channels each value carries
        self.tuples: set[fx.Node] = set()  # ops that return a tuple whose first item carries the input's channels
        self.producer: dict[int, fx.Node] = {}
        self.n: dict[int, int] = {}
        self.unit: dict[int, int] = {}
        self.bad: dict[int, str] = {}
        self.edits: list[Edit] = []
        self.carriers: dict[int, set[fx.Node]] = {}
        self.consumer_inputs: dict[int, list[tuple[fx.Node, Edit, int]]] = {}
        self.count_readers: dict[fx.Node, Chan] = {}  # nodes that read a channel count at run time
        self.label: dict[int, str] = {}  # stable name of a space: producer name, [k] per split into pieces
        self.pieces: dict[fx.Node, list[Chan]] = {}  # splits of the channel axis: the channels of each piece
        self.int_splits: list[tuple[fx.Node, list[Chan]]] = []
        self.handled_readers: set[tuple[fx.Node, fx.Node]] = set()
        self.readers = ir.tensor_readers(gm)

    # -- values and couplings ---------------------------------------------------------------------
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

    # -- edits ---------------------------------------------------------------------------------------
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

    # -- producers and consumers ---------------------------------------------------------------------
    def new_space(self, node: fx.Node, n: int) -> int:
        sid = len(self.producer)
        self.producer[sid], self.n[sid], self.unit[sid], self.label[sid] = node, n, 1, node.name
        self.carriers[sid] = {node}
        self.consumer_inputs[sid] = []
        self.g.add_node(sid)
        return sid

    def produce(self, node: fx.Node, layer: Layer, axis: int) -> None:
        """``node`` produces a space of its own on ``axis`` of its output: its weight rows and bias."""
        sid = self.new_space(node, int(layer.w.shape[layer.out_dim]))
        self.edits.append(Edit(node, sid, "tensor", layer.weight, layer.out_dim, 0, Fraction(1), "producer"))
        if layer.bias is not None:
            self.edits.append(Edit(node, sid, "tensor", layer.bias, 0, 0, Fraction(1), "producer"))
        self.carry(node, Chan(axis, ((sid, self.n[sid]),)))

    def consume(self, node: fx.Node, x: fx.Node, xin: Chan, layer: Layer) -> None:
        """``node`` reads the channels ``xin`` of its input ``x`` through the columns of its weight."""
        for e in self.tensor_edits(node, xin, layer.weight, layer.in_dim, "consumer"):
            self.consumer_inputs[e.space].append((x, e, xin.axis))

    # -- constants -------------------------------------------------------------------------------------
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

    def layer(self, op: Op) -> Layer | str:
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
            return Layer(wref, bref, stored, 1 if addmm else 0, 0 if addmm else 1)
        transposed = bool(op.attrs.get("transposed"))
        return Layer(wref, bref, stored, 1 if transposed else 0, 0 if transposed else 1)

    # -- cutting a space into pieces -------------------------------------------------------------------
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
