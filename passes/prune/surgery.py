"""Cutting a group's removed channels out of the graph: every tensor and size literal its edits name.

With R the removed channels of a group (its ``n`` channels less the kept K), an edit at offset o
with s indices per channel removes the positions {o + c·s + j : c ∈ R, 0 ≤ j < s} along its dim
(with s < 1 one index covers 1/s channels, a head: the positions {o + ⌊c·s⌋}), and a literal
shrinks by |R|·s. Modules are rebuilt as copies with sliced tensors and re-derived sizes;
constants read through get_attr are replaced by new sliced constants. The original tensors and
modules are never changed, so a program cloned before pruning keeps its own.
"""

from __future__ import annotations

import copy
import inspect
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ... import ir
from .channels import Group, analyse


# -- the math ----------------------------------------------------------------------------------------------
def removed_positions(removed: torch.Tensor, offset: int, scale: Fraction) -> torch.Tensor:
    """Positions along an axis of the removed channels: channel c covers indices c·s … c·s+s−1 from
    ``offset`` (s = ``scale``); with s < 1 one index covers 1/s channels (a head)."""
    if scale >= 1:
        s = int(scale)
        return (removed[:, None] * s + torch.arange(s, device=removed.device)).reshape(-1) + offset
    return torch.unique(removed // int(1 / scale)) + offset


def drop(t: torch.Tensor, dims: dict[int, set[int]]) -> torch.Tensor:
    """A new tensor: ``t`` without the positions ``dims[d]`` along each dim d."""
    out = t.detach()
    for d, gone in dims.items():
        keep = [i for i in range(out.shape[d]) if i not in gone]
        out = out.index_select(d, torch.tensor(keep, dtype=torch.long, device=out.device))
    return out.clone()


# -- pruning one group ----------------------------------------------------------------------------------------
def prune_group(program: Any, key: tuple[str, ...], n: int, keep: torch.Tensor, *, shapes_fresh: bool = False) -> None:
    """Keep channels ``keep`` of the group ``key`` (see ``optic.passes.prune.channels.Group.key``) in ``program``.

    The analysis runs again on the program given (its shapes are recorded first unless
    ``shapes_fresh``), so pruning composes with earlier changes, prunes of other groups included:
    pruned nodes keep their names. The group must still have ``n`` channels."""
    gm = program.gm
    if not shapes_fresh:
        program.annotate_shapes()
    group = next((g for g in analyse(gm).groups if g.key == key), None)
    if group is None:
        raise ValueError(f"prune: the channel group of {', '.join(key)} is no longer in the graph "
                         "(another change rewrote its layers)")
    if group.reason:
        raise ValueError(f"prune: the channel group of {', '.join(key)} cannot be pruned here: {group.reason}")
    if group.n != n:
        raise ValueError(f"prune: the channel group of {', '.join(key)} has {group.n} channels, expected {n}")
    slice_group(gm, group, keep)
    ir.eliminate_dead_code(gm)
    ir.drop_unused_constants(gm)
    gm.recompile()


def slice_group(gm: fx.GraphModule, group: Group, keep: torch.Tensor) -> None:
    """Keep channels ``keep`` of ``group`` in ``gm``: every tensor and size the group's edits name."""
    removed = torch.tensor(sorted(set(range(group.n)) - set(keep.tolist())), dtype=torch.long, device="cpu")
    if len(removed) == 0:
        return
    tensors, literals = _cuts(group, removed)
    for node in group.nodes:
        t_edits, l_edits = tensors.get(node, {}), literals.get(node, {})
        if not t_edits and not l_edits:
            continue
        by = {ref: int(v) for ref, v in l_edits.items()}
        if node.op == "call_module":
            _rebuild_module(gm, node, t_edits, by)
        else:
            _rewrite_call(gm, node, t_edits, by)


def _cuts(group: Group, removed: torch.Tensor) -> tuple[dict[fx.Node, dict[tuple, dict[int, set[int]]]],
                                                         dict[fx.Node, dict[tuple, Fraction]]]:
    """Per node: the positions to remove from each tensor (per dim), and how much each literal shrinks."""
    tensors: dict[fx.Node, dict[tuple, dict[int, set[int]]]] = {}
    literals: dict[fx.Node, dict[tuple, Fraction]] = {}
    for e in group.edits:
        if e.kind == "tensor":
            pos = removed_positions(removed, e.offset, e.scale).tolist()
            tensors.setdefault(e.node, {}).setdefault(e.ref, {}).setdefault(e.dim, set()).update(pos)
        else:
            per = literals.setdefault(e.node, {})
            per[e.ref] = per.get(e.ref, Fraction(0)) + len(removed) * e.scale
    return tensors, literals


# -- module calls -------------------------------------------------------------------------------------------
def _rebuild_module(gm: fx.GraphModule, node: fx.Node, tensors: dict[tuple, dict[int, set[int]]],
                    literals: dict[tuple, int]) -> None:
    mod = gm.get_submodule(node.target)
    new = _copy_module(mod)
    for ref, dims in tensors.items():
        name = ref[1]
        t = drop(getattr(mod, name), dims)
        if name in mod._parameters:
            new._parameters[name] = nn.Parameter(t, requires_grad=mod._parameters[name].requires_grad)
        else:
            new._buffers[name] = t
    for ref, by in literals.items():
        _, name, index = ref
        setattr(new, name, _shrink(getattr(new, name), index, by))
    _sync_sizes(new)
    *path, leaf = node.target.split(".")
    parent = gm.get_submodule(".".join(path)) if path else gm
    setattr(parent, leaf, new)


def _copy_module(mod: nn.Module) -> nn.Module:
    """A shallow copy with its own parameter and buffer tables (the original is never changed)."""
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)
    new._buffers = dict(mod._buffers)
    new._modules = dict(mod._modules)
    new._non_persistent_buffers_set = set(mod._non_persistent_buffers_set)
    return new


def _sync_sizes(mod: nn.Module) -> None:
    """Re-derive a module's size attributes from its (sliced) tensors."""
    if isinstance(mod, nn.modules.conv._ConvNd):
        w = mod.weight
        if mod.transposed:
            mod.in_channels, mod.out_channels = w.shape[0], w.shape[1] * mod.groups
        else:
            mod.out_channels, mod.in_channels = w.shape[0], w.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear):
        mod.out_features, mod.in_features = mod.weight.shape
    elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
        t = mod.running_mean if mod.running_mean is not None else mod.weight
        if t is not None:
            mod.num_features = t.shape[0]


# -- function and method calls --------------------------------------------------------------------------------
def _rewrite_call(gm: fx.GraphModule, node: fx.Node, tensors: dict[tuple, dict[int, set[int]]],
                  literals: dict[tuple, int]) -> None:
    """Read sliced copies of the constants, and the shrunk sizes, in the arguments of ``node``."""
    for ref, dims in tensors.items():
        old = ref[1]
        with gm.graph.inserting_before(node):
            new = ir.const_node(gm.graph, gm, drop(ir.fetch_attr(gm, old.target), dims), f"pruned_{old.name}")
        node.replace_input_with(old, new)
    for ref, n in literals.items():
        if ref[0] == "shape":
            set_shape_arg(node, ref[1], ir.shape(node)[ref[1]] - n)
        elif ref[0] == "split":
            _shrink_split(node, ref[1], ref[2], n)
        else:
            _shrink_arg(node, ref[1], ref[2], n)


def _shrink(value: Any, index: int | None, by: int) -> Any:
    if index is None:
        return value - by
    items = list(value)
    items[index] -= by
    return type(value)(items) if isinstance(value, tuple) else items


def _shrink_arg(node: fx.Node, name: str, index: int | None, by: int) -> None:
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: _shrink(node.kwargs[name], index, by)}
        return
    pos = _param_position(node.target, name)
    if pos is None or pos >= len(node.args):
        raise ValueError(f"prune: cannot find argument '{name}' of '{node.name}'")
    args = list(node.args)
    args[pos] = _shrink(args[pos], index, by)
    node.args = tuple(args)


def _param_position(target: Any, name: str) -> int | None:
    schema = getattr(target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
        return names.index(name) if name in names else None
    try:
        sigs = [inspect.signature(target)]
    except (TypeError, ValueError):  # a builtin: its TorchScript schemas
        from torch.fx.operator_schemas import get_signature_for_torch_op

        sigs = get_signature_for_torch_op(target) or []
    found = {list(s.parameters).index(name) for s in sigs if name in s.parameters}
    return found.pop() if len(found) == 1 else None


def _shrink_split(node: fx.Node, index: int | None, dim: int, by: int) -> None:
    """Shrink a split's chunk size (``index`` None) or entry ``index`` of its sizes; a size computed at
    run time becomes the literal it evaluated to (read from the recorded shapes of the pieces)."""
    if len(node.args) > 1:
        where, value = 1, node.args[1]
    else:
        where = next(k for k in ("split_size", "split_sizes", "split_size_or_sections") if k in node.kwargs)
        value = node.kwargs[where]
    if isinstance(value, fx.Node):
        value = int(node.meta["tensor_meta"][index or 0].shape[dim])
    value = _shrink(value, index, by)
    if where == 1:
        node.args = (node.args[0], value, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, where: value}


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
