"""Emitting nodes: the canonical (ATen) spelling optic writes when a pass creates an op.

Every helper inserts at the graph's current insertion point (use ``graph.inserting_before``) and
returns the new node. ATen ops run the same kernels as their module and functional spellings and
keep a re-export of the graph (for lowering) exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import const_node

aten = torch.ops.aten


def constant(graph: fx.Graph, gm: fx.GraphModule, tensor: torch.Tensor | None, hint: str) -> fx.Node | None:
    return None if tensor is None else const_node(graph, gm, tensor, hint)


def conv(graph: fx.Graph, x: fx.Node, w: fx.Node, b: fx.Node | None, attrs: dict[str, Any]) -> fx.Node:
    """A convolution with the hyper-parameters of an op-view conv (``attrs``)."""
    nd = attrs["nd"]
    mode = attrs.get("padding_mode", "zeros")
    padding = attrs.get("padding")
    if mode != "zeros":
        # F.pad takes the last dimension first, (left, right) per dimension
        pads = [p for p in reversed(padding) for _ in (0, 1)]
        x = graph.call_function(F.pad, (x, pads, mode))
        padding = [0] * nd
    if padding is None:  # asymmetric 'same': only the functional spelling expresses it
        fn = getattr(F, f"conv{nd}d")
        return graph.call_function(fn, (x, w, b, attrs["stride"], attrs["padding_str"], attrs["dilation"], attrs["groups"]))
    return graph.call_function(aten.convolution.default, (
        x, w, b, list(attrs["stride"]), list(padding), list(attrs["dilation"]), bool(attrs.get("transposed")),
        list(attrs.get("output_padding") or [0] * nd), int(attrs["groups"])))


def linear(graph: fx.Graph, x: fx.Node, w: fx.Node, b: fx.Node | None) -> fx.Node:
    return graph.call_function(aten.linear.default, (x, w, b))


def scale_shift(graph: fx.Graph, x: fx.Node, scale: fx.Node, shift: fx.Node) -> fx.Node:
    """``x · scale + shift`` in one kernel (addcmul)."""
    return graph.call_function(aten.addcmul.default, (shift, x, scale))


def layer_norm(graph: fx.Graph, x: fx.Node, normalized_shape: list[int], eps: float) -> fx.Node:
    return graph.call_function(aten.layer_norm.default, (x, list(normalized_shape), None, None, float(eps)))


def rms_norm(graph: fx.Graph, x: fx.Node, normalized_shape: list[int], eps: float | None) -> fx.Node:
    return graph.call_function(aten.rms_norm.default, (x, list(normalized_shape), None, eps))


def split_last(graph: fx.Graph, x: fx.Node, sizes: list[int]) -> list[fx.Node]:
    """Split the last dimension into ``sizes``; one getitem node per piece."""
    parts = graph.call_function(aten.split_with_sizes.default, (x, list(sizes), -1))
    import operator

    return [graph.call_function(operator.getitem, (parts, i)) for i in range(len(sizes))]


def transpose_last(graph: fx.Graph, x: fx.Node) -> fx.Node:
    return graph.call_function(aten.transpose.int, (x, -2, -1))


def sdpa(graph: fx.Graph, q: fx.Node, k: fx.Node, v: fx.Node, mask: Any, scale: float | fx.Node) -> fx.Node:
    """``scale``: a number, or a node computing one (a scale that depends on the input's shape)."""
    return graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v, mask, 0.0, False),
                               {"scale": scale if isinstance(scale, fx.Node) else float(scale)})


def activation(graph: fx.Graph, x: fx.Node, fn: str, attrs: dict[str, Any]) -> fx.Node:
    """An activation in its ATen spelling (hyper-parameters from the op view)."""
    if fn == "hardtanh":
        return graph.call_function(aten.hardtanh.default, (x, attrs["min_val"], attrs["max_val"]))
    if fn == "leaky_relu":
        return graph.call_function(aten.leaky_relu.default, (x, attrs["negative_slope"]))
    if fn == "gelu":
        return graph.call_function(aten.gelu.default, (x,), {"approximate": attrs.get("approximate", "none")})
    if fn == "elu":
        return graph.call_function(aten.elu.default, (x, attrs.get("alpha", 1.0)))
    return graph.call_function(getattr(aten, fn).default, (x,))
