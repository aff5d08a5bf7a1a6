"""How channels flow through each kind of op: the transfer table of the channel analysis.

``TRANSFER[kind](sp, op, ins)`` reads the channels of the op's tracked inputs ``ins`` (``sp.desc``,
see ``optic.passes.prune.spaces``) and records what the op does with them: the channels of its
output (``sp.carry``), inputs it couples (``sp.union``), what pruning slices or shrinks at the op
(``sp.tensor_edits``, ``sp.literal_edits``), or why the channels cannot be pruned (``sp.mark_bad``).

Most ops read one data input and keep, move or drop its channel axis. Their entries are
``one_input(fn)``: ``fn(sp, op, chan)`` gets the input's channels and returns the output's
(a :class:`Chan`), the channels of each piece of a split (a list), or the reason the op cannot
keep them (a string). Which Chan object an entry returns matters: operands of an elementwise op
that hold the same object are one value read twice and couple nothing, while equal objects from
different paths couple their spaces (with themselves, which keeps a split from cutting them later).
Ops of one behaviour share one entry (elementwise unary ops, pooling and resampling, the norms
over the last axes, reshape and flatten, the binary elementwise ops). Producers (``PRODUCERS``) run even when no input carries channels: they create them. A kind
without an entry reads its channels in a way the analysis does not understand:
:func:`not_understood` declines every space it reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch.fx as fx

from ... import ir
from ...ir.opview import Op
from .spaces import Chan, Layer, Spaces, norm_dim, rank

Transfer = Callable[[Spaces, Op, list[fx.Node]], None]
OneInput = Callable[[Spaces, Op, Chan], "Chan | list[Chan] | str"]


# -- ops with one data input ------------------------------------------------------------------------
def one_input(fn: OneInput, tuple_out: Callable[[Op], bool] | None = None) -> Transfer:
    """The transfer of an op whose channels come from its data input ``op.x`` alone; another input
    that carries channels is read as a parameter (declined). ``tuple_out``: whether the op returns a
    tuple whose first item carries the channels."""
    def transfer(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
        if tuple_out is not None and tuple_out(op):
            sp.tuples.add(op.node)
        chan = sp.desc.get(op.x) if isinstance(op.x, fx.Node) else None
        for a in ins:
            if a is not op.x:
                sp.mark_bad(sp.desc[a], f"'{op.node.name}' ({op.kind}) reads them as a parameter")
        if chan is None:
            return
        if rank(op.x) is None or rank(op.node) is None and op.node not in sp.tuples:
            sp.mark_bad(chan, f"'{op.node.name}': shapes unknown")
            return
        out = fn(sp, op, chan)
        if isinstance(out, str):
            sp.mark_bad(chan, out)
        elif isinstance(out, list):
            sp.pieces[op.node] = out
            for p in out:
                sp.touch(op.node, p)
        else:
            sp.carry(op.node, out)

    transfer.__name__ = transfer.__qualname__ = f"one_input({fn.__name__})"
    return transfer


def declared_tuple(op: Op) -> bool:
    return bool(op.attrs.get("tuple_out"))


def returns_tuple(op: Op) -> bool:
    tm = op.node.meta.get("tensor_meta", op.node.meta.get("val"))
    return declared_tuple(op) or isinstance(tm, (tuple, list))


def same_rank(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    """Elementwise on one input: every channel stays where it is."""
    return chan if rank(op.node) == rank(op.x) else f"'{op.node.name}' changes the rank"


def spatial(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    """Pooling and resampling over the last ``nd`` axes."""
    r = rank(op.x)
    nd = op.attrs.get("nd") or r - 2
    return f"'{op.node.name}' ({op.kind}) works over the channel axis" if chan.axis >= r - nd else chan


def _slice_params(sp: Spaces, op: Op, chan: Chan, roles: tuple[str, ...], who: str) -> str | None:
    """Slice the per-channel parameters ``roles`` of ``op`` along dim 0, or say why they cannot be."""
    refs = {role: sp.const_ref(op, role) for role in roles}
    bad = next((r for r in refs.values() if isinstance(r, str)), None)
    if bad:
        return f"{who}: {bad}"
    for ref in refs.values():
        if ref is not None:
            sp.tensor_edits(op.node, chan, ref, 0)
    return None


def batch_norm(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    """γ, β, μ, σ²[K] along the channel axis 1."""
    if chan.axis != 1 or chan.scale != 1:
        return f"BatchNorm '{op.node.name}' normalizes another axis than the channels"
    return _slice_params(sp, op, chan, ("weight", "bias", "running_mean", "running_var"),
                         f"BatchNorm '{op.node.name}'") or chan


def last_axes_norm(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    """LayerNorm and RMSNorm over the last axes: over the channels alone, γ (and β)[K] and a smaller
    normalized_shape; over other axes, the channels pass."""
    ns = list(op.attrs.get("normalized_shape") or [])
    if chan.axis < rank(op.x) - len(ns):
        return chan
    if len(ns) != 1:
        return f"'{op.node.name}' normalizes the channels together with other axes"
    roles = ("weight", "bias") if op.kind == "layer_norm" else ("weight",)
    if why := _slice_params(sp, op, chan, roles, f"'{op.node.name}' ({op.kind})"):
        return why
    sp.literal_edits(op.node, chan, ("arg", "normalized_shape", -1))
    return chan


def group_norm(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    return f"GroupNorm '{op.node.name}' normalizes groups of channels" if chan.axis == 1 else chan


def softmax(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    if norm_dim(op.attrs.get("dim"), rank(op.x)) == chan.axis:
        return f"softmax '{op.node.name}' normalizes over the channels"
    return chan


def mean(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    """A reduction over other axes: the channel axis moves left by the axes reduced before it."""
    r = rank(op.x)
    dims = op.attrs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    dims = [norm_dim(d, r) for d in dims]
    if not dims or chan.axis in dims or None in dims:
        return f"'{op.node.name}' averages over the channels"
    return chan.moved(chan.axis if op.attrs.get("keepdim") else chan.axis - sum(d < chan.axis for d in dims))


def transpose(sp: Spaces, op: Op, chan: Chan) -> Chan:
    r = rank(op.x)
    d0, d1 = norm_dim(op.attrs.get("dim0"), r), norm_dim(op.attrs.get("dim1"), r)
    return chan.moved(d1 if chan.axis == d0 else d0 if chan.axis == d1 else chan.axis)


def permute(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    dims = [norm_dim(d, rank(op.x)) for d in (op.attrs.get("dims") or [])]
    if chan.axis not in dims:
        return f"permute '{op.node.name}' has unreadable dims"
    return chan.moved(dims.index(chan.axis))


def reshape(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    """Reshapes that merge the channel axis with later axes (one channel covers several features) or
    split it into heads (one index covers several channels); an explicit size shrinks with them."""
    node = op.node
    s, t = ir.shape(op.x), ir.shape(node)
    new = reshape_chan(s, t, chan)
    if new is None:
        return f"'{node.name}' reshapes the channel axis into other axes ({list(s)} → {list(t)})"
    if op.kind == "reshape":
        sizes = shape_args(node)
        if sizes is None or len(sizes) != len(t):
            return f"'{node.name}': its size arguments cannot be read"
        arg = sizes[new.axis]
        if isinstance(arg, fx.Node):  # replaced by a literal when pruned
            sp.handled_readers.add((node, arg))
        if not (isinstance(arg, int) and arg == -1):
            sp.literal_edits(node, new, ("shape", new.axis))
    return new


def pad(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    p = list(op.attrs.get("pad") or [])
    i = rank(op.x) - 1 - chan.axis  # pads come in (before, after) pairs, last dim first
    if 2 * i + 1 < len(p) and (p[2 * i] != 0 or p[2 * i + 1] != 0):
        return f"'{op.node.name}' pads the channels"
    return chan


def slice_other_axis(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    if norm_dim(op.attrs.get("dim") or 0, rank(op.x)) == chan.axis:
        return f"'{op.node.name}' slices the channels"
    return chan


def unsqueeze(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    d = norm_dim(op.attrs.get("dim"), rank(op.node))
    if d is None:
        return f"'{op.node.name}': unreadable dim"
    return chan.moved(chan.axis + (d <= chan.axis))


def squeeze(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    s = ir.shape(op.x)
    dims = op.attrs.get("dim")
    dims = [i for i, v in enumerate(s) if v == 1] if dims is None else [dims] if isinstance(dims, int) else list(dims)
    gone = [d for d in (norm_dim(d, len(s)) for d in dims) if d is not None and s[d] == 1]
    if chan.axis in gone:
        return f"'{op.node.name}' squeezes the channel axis"
    return chan.moved(chan.axis - sum(d < chan.axis for d in gone))


def basic_index(sp: Spaces, op: Op, chan: Chan) -> Chan | str:
    """Basic indexing (``x[:, :, 1:]``, ``x[..., None]``) that keeps every channel."""
    index = op.attrs.get("index")
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        return f"'{op.node.name}' indexes the tensor with tensors"
    r = rank(op.x)
    used = sum(isinstance(i, (int, slice)) for i in items)
    src = dst = 0
    axis = None
    for item in items:
        if item is None:
            dst += 1
        elif item is Ellipsis:
            k = r - used
            if src <= chan.axis < src + k:
                axis = dst + chan.axis - src
            src, dst = src + k, dst + k
        elif isinstance(item, int) or item != slice(None):
            if src == chan.axis:
                return f"'{op.node.name}' indexes the channels"
            src, dst = src + 1, dst + (not isinstance(item, int))
        else:
            if src == chan.axis:
                axis = dst
            src, dst = src + 1, dst + 1
    return chan.moved(dst + chan.axis - src if axis is None else axis)


def split(sp: Spaces, op: Op, chan: Chan) -> Chan | list[Chan] | str:
    """Along another axis every piece carries the channels; along the channel axis each piece gets
    its own channels, and a space the split cuts becomes one space per piece (a fused q/k/v)."""
    dim = op.attrs.get("dim")
    if norm_dim(0 if dim is None else dim, rank(op.x)) != chan.axis:
        return chan
    pieces = _split_channels(sp, op, chan)
    return f"'{op.node.name}' {pieces}" if isinstance(pieces, str) else pieces


def _split_channels(sp: Spaces, op: Op, chan: Chan) -> list[Chan] | str:
    """The channels of each piece of a split along the channel axis, or why not."""
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
        if inside and space is not None and (why := sp.refine(space, inside)):
            return why
        at += length
    chan = sp.desc[op.x]  # refined
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
        sp.int_splits.append((op.node, pieces))
        sp.literal_edits(op.node, pieces[0], ("split", None, chan.axis))
    else:
        for i, p in enumerate(pieces):
            sp.literal_edits(op.node, p, ("split", i, chan.axis))
    return pieces


# -- producers and consumers --------------------------------------------------------------------------
def _layer_input(sp: Spaces, op: Op, ins: list[fx.Node]) -> tuple[Chan | None, Layer | str]:
    """The channels of a conv/linear's input and its weights (or why they cannot be sliced); an
    input that carries channels into the weights is declined."""
    xin = sp.desc.get(op.x) if isinstance(op.x, fx.Node) else None
    for a in ins:
        if a is not op.x:
            sp.mark_bad(sp.desc[a], f"'{op.node.name}' computes its weights from them")
    return xin, sp.layer(op)


def _dense(sp: Spaces, op: Op, xin: Chan | None, layer: Layer | str, reads: Callable[[Chan], bool],
           off_axis: str, out_axis: int | None) -> None:
    """A layer that reads all its input channels (``reads``: on its channel axis, else ``off_axis``)
    through its weight columns, and produces a space of its own on ``out_axis`` of its output."""
    node = op.node
    why = layer if isinstance(layer, str) else None
    if xin is not None:
        if why:
            sp.mark_bad(xin, f"consumer '{node.name}': {why}")
        elif not reads(xin):
            sp.mark_bad(xin, off_axis)
        else:
            sp.consume(node, op.x, xin, layer)
    if not why and out_axis is not None:
        sp.produce(node, layer, out_axis)


def linear(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
    xin, layer = _layer_input(sp, op, ins)
    out_rank = rank(op.node)
    _dense(sp, op, xin, layer, lambda c: c.axis == rank(op.x) - 1 and c.scale.denominator == 1,
           f"'{op.node.name}' is a linear over another axis than the channels", out_rank - 1 if out_rank else None)


def conv(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
    """A dense conv consumes and produces; a depthwise conv (groups = channels) passes its input's
    channels, W[K] and groups = |K|; other grouped convs decline."""
    xin, layer = _layer_input(sp, op, ins)
    groups = int(op.attrs.get("groups") or 1)
    if groups == 1:
        _dense(sp, op, xin, layer, lambda c: c.axis == 1 and c.scale == 1,
               f"'{op.node.name}' convolves over the channel axis", 1 if rank(op.node) else None)
        return
    if xin is None:
        return
    w, transposed = op.const("weight"), bool(op.attrs.get("transposed"))
    c_in = (w.shape[0] if transposed else w.shape[1] * groups) if w is not None else None
    c_out = (w.shape[1] * groups if transposed else w.shape[0]) if w is not None else None
    if not (groups == c_in == c_out):
        sp.mark_bad(xin, f"grouped convolution '{op.node.name}' (groups={groups}) couples its channels in groups; "
                         "pruning whole groups is not supported")
        return
    if isinstance(layer, str) or xin.axis != 1 or xin.scale != 1:
        sp.mark_bad(xin, f"depthwise convolution '{op.node.name}': "
                         f"{layer if isinstance(layer, str) else 'channels not on axis 1'}")
        return
    sp.tensor_edits(op.node, xin, layer.weight, 0)
    if layer.bias is not None:
        sp.tensor_edits(op.node, xin, layer.bias, 0)
    sp.literal_edits(op.node, xin, ("arg", "groups", None))
    sp.carry(op.node, xin)


# -- ops that combine several inputs ------------------------------------------------------------------
def _combine(sp: Spaces, op: Op, data: list[Any], masks: list[Any]) -> None:
    """``data`` operands combine elementwise into the output (their channels are coupled; a constant
    operand along the channels is sliced); ``masks`` only broadcast against it."""
    node = op.node
    out_rank = rank(node)
    carrying = [(a, sp.desc[a]) for a in data + masks if isinstance(a, fx.Node) and a in sp.desc]
    if out_rank is None:
        for _, c in carrying:
            sp.mark_bad(c, f"'{node.name}': shapes unknown")
        return
    out_axes = {out_rank - (rank(a) - c.axis) for a, c in carrying}
    if len(out_axes) != 1:
        for _, c in carrying:
            sp.mark_bad(c, f"'{node.name}' combines channels on different axes")
        return
    axis = out_axes.pop()
    first_data = next(((a, c) for a, c in carrying if a in data), None)
    if first_data is None:  # only a mask carries channels
        for _, c in carrying:
            sp.mark_bad(c, f"'{node.name}' uses them as a mask")
        return
    ref = first_data[1]
    for a, c in carrying:
        if c is not ref and a in data:
            sp.union(ref, c, node)
        elif a in masks:
            sp.mark_bad(c, f"'{node.name}' uses them as a mask")
    for a in data + masks:
        if not isinstance(a, fx.Node) or a in sp.desc:
            continue
        s = ir.shape(a)
        if s is None:
            continue  # a scalar computed at run time
        idx = axis - (out_rank - len(s))
        size = 1 if idx < 0 else s[idx]
        if size == 1:
            continue
        if a.op == "get_attr" and a in data and size == ref.size:
            t = ir.fetch_attr(sp.gm, a.target)
            if ir.is_shared(sp.gm, t, node, sp.readers) or len(a.users) > 1:
                sp.mark_bad(ref, f"'{node.name}' reads constant '{a.name}', which is shared")
            else:
                sp.tensor_edits(node, ref, ("const", a), idx)
            continue
        sp.mark_bad(ref, f"'{node.name}' combines them with '{a.name}', whose channels are not pruned with them")
    sp.carry(node, ref.moved(axis))


def elementwise(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
    """add, sub, mul, div, pow: a residual or a gate couples the operands' channels."""
    _combine(sp, op, [op.x, op.other], [])


def masked(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
    """where, masked_fill: the two values are coupled, the mask must not carry channels."""
    _combine(sp, op, [op.x, op.other], [op.attrs.get("mask")])


def cat(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
    """Along the channel axis the inputs' channels lie side by side; along another axis they are coupled."""
    node = op.node
    tensors = list(op.x or [])
    r = rank(node)
    dim = norm_dim(op.attrs.get("dim") or 0, r)
    chans = [sp.desc.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    present = [c for c in chans if c is not None]
    if r is None or any(rank(t) != r for t in tensors if isinstance(t, fx.Node)):
        for c in present:
            sp.mark_bad(c, f"cat '{node.name}': shapes unknown or of different ranks")
        return
    if any(c.axis != present[0].axis for c in present):
        for c in present:
            sp.mark_bad(c, f"cat '{node.name}' joins channels on different axes")
        return
    axis = present[0].axis
    if dim != axis:
        for t, c in zip(tensors, chans, strict=True):
            if c is None:
                sp.mark_bad(present[0], f"cat '{node.name}' joins them with '{getattr(t, 'name', t)}', "
                                        "whose channels cannot be pruned")
            elif c is not present[0]:
                sp.union(present[0], c, node)
        sp.carry(node, present[0])
        return
    scale = present[0].scale
    if any(c.scale != scale for c in present):
        for c in present:
            sp.mark_bad(c, f"cat '{node.name}' joins channels of different granularity")
        return
    parts: list[tuple[int | None, int]] = []
    for t, c in zip(tensors, chans, strict=True):
        parts.extend(c.parts if c is not None else [(None, ir.shape(t)[dim])])
    sp.carry(node, Chan(axis, tuple(parts), scale))


def matmul(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
    """Channels on a kept axis pass to the output; the batch axes of both sides are coupled; a
    contracted axis declines."""
    node, a, b = op.node, op.x, op.other
    ca = sp.desc.get(a) if isinstance(a, fx.Node) else None
    cb = sp.desc.get(b) if isinstance(b, fx.Node) else None
    ra, rb, ro = rank(a), rank(b), rank(node)
    present = [c for c in (ca, cb) if c is not None]
    if None in (ra, rb, ro) or ra < 2 or rb < 2:
        for c in present:
            sp.mark_bad(c, f"matmul '{node.name}' on vectors or unknown shapes")
        return
    out: list[tuple[int, Chan]] = []
    batch: dict[int, Chan] = {}
    for c, r, contracted, kept_axis in ((ca, ra, ra - 1, ra - 2), (cb, rb, rb - 2, rb - 1)):
        if c is None:
            continue
        if c.axis == contracted:
            sp.mark_bad(c, f"matmul '{node.name}' contracts over the channels")
            return
        o = ro - (r - c.axis)
        if c.axis == kept_axis:
            out.append((o, c))
        else:
            batch.setdefault(o, c)
            if batch[o] is not c:
                sp.union(batch[o], c, node)
            out.append((o, batch[o]))
    axes = {o for o, _ in out}
    if len(axes) != 1:
        for c in present:
            sp.mark_bad(c, f"matmul '{node.name}' puts channels on two axes of its output")
        return
    o = axes.pop()
    if len(present) == 1 and o < ro - 2:  # a batch axis carried by one side only: the other must broadcast
        other = b if ca is not None else a
        s = ir.shape(other)
        idx = o - (ro - len(s))
        if idx >= 0 and s[idx] != 1:
            sp.mark_bad(present[0], f"matmul '{node.name}' pairs them with '{other.name}', whose channels are not pruned")
            return
    sp.carry(node, out[0][1])


def attention(sp: Spaces, op: Op, ins: list[fx.Node]) -> None:
    """scaled_dot_product_attention: the heads of q, k and v are coupled and pass to the output."""
    node = op.node
    q = op.x
    k, v = op.other
    chans = [sp.desc.get(t) if isinstance(t, fx.Node) else None for t in (q, k, v)]
    present = [c for c in chans if c is not None]
    mask = op.attrs.get("attn_mask")
    if mask in sp.desc:
        sp.mark_bad(sp.desc[mask], f"attention '{node.name}' uses them as a mask")
    if not present:
        return
    if node.kwargs.get("enable_gqa"):
        for c in present:
            sp.mark_bad(c, f"attention '{node.name}' shares key/value heads (GQA)")
        return
    if len(present) != 3:
        for c in present:
            sp.mark_bad(c, f"attention '{node.name}' pairs heads with q/k/v whose heads cannot be pruned")
        return
    if any(c.axis != rank(t) - 3 for c, t in zip(chans, (q, k, v), strict=True)):
        for c in present:
            sp.mark_bad(c, f"attention '{node.name}' reads them on another axis than the heads")
        return
    sp.union(chans[0], chans[1], node)
    sp.union(chans[0], chans[2], node)
    if isinstance(mask, fx.Node) and mask not in sp.desc and (s := ir.shape(mask)) is not None:
        idx = len(s) - 3
        if idx >= 0 and s[idx] != 1:
            sp.mark_bad(chans[0], f"attention '{node.name}' has a mask per head ('{mask.name}')")
    sp.carry(node, chans[2].moved(rank(node) - 3))


def not_understood(sp: Spaces, node: fx.Node, op: Op | None, ins: list[fx.Node]) -> None:
    """The fallback for a kind without an entry (or a node the op view does not classify, such as
    ``roll`` or an in-place ``add_``): every space it reads is declined."""
    what = op.kind if op is not None else f"{node.op} {_target_name(node)}"
    for a in ins:
        sp.mark_bad(sp.desc[a], f"'{node.name}' ({what}) reads them in a way pruning does not understand")


def _target_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target)) if node.op != "call_module" else str(node.target)


# -- the table ------------------------------------------------------------------------------------------
PRODUCERS = frozenset({"conv", "linear"})

TRANSFER: dict[str, Transfer] = {
    # one element in, one element out: the channels stay
    **dict.fromkeys(("act", "dropout", "identity", "contiguous", "cast", "neg", "exp", "sqrt", "rsqrt"),
                    one_input(same_rank)),
    # over the spatial axes after the channels
    **dict.fromkeys(("pool", "resample"), one_input(spatial, returns_tuple)),
    # normalizations
    "batch_norm": one_input(batch_norm, declared_tuple),
    **dict.fromkeys(("layer_norm", "rms_norm"), one_input(last_axes_norm, declared_tuple)),
    "group_norm": one_input(group_norm),
    "softmax": one_input(softmax),
    # reductions
    "mean": one_input(mean),
    # moving, merging and splitting axes
    "transpose": one_input(transpose),
    "permute": one_input(permute),
    **dict.fromkeys(("reshape", "flatten"), one_input(reshape)),
    "unsqueeze": one_input(unsqueeze),
    "squeeze": one_input(squeeze),
    "split": one_input(split, lambda op: True),
    # indexing and padding other axes
    "getitem": one_input(basic_index),
    "slice": one_input(slice_other_axis),
    "pad": one_input(pad),
    # producers and consumers
    "conv": conv,
    "linear": linear,
    # several inputs
    **dict.fromkeys(("add", "sub", "mul", "div", "pow"), elementwise),
    **dict.fromkeys(("where", "masked_fill"), masked),
    "cat": cat,
    "matmul": matmul,
    "sdpa": attention,
}


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


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def shape_args(node: fx.Node) -> list[Any] | None:
    """The size arguments of a view/reshape node, one per output dim."""
    if node.op == "call_method":
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            return list(rest[0])
        return rest or list(node.kwargs.get("shape", node.kwargs.get("size", [])) or []) or None
    args = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape", node.kwargs.get("size"))
    return list(args) if isinstance(args, (list, tuple)) else None
