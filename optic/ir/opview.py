"""The op view: what a node computes, whatever its spelling.

``view(node, gm)`` returns an :class:`Op` for a module call (``nn.Conv2d``), a functional call
(``F.conv2d``, ``torch.relu``, ``operator.add``), a tensor method (``x.relu()``) or an ATen op
(``aten.conv2d.default``, ``aten.addmm``) alike, with normalized hyper-parameters and the constant
tensors it reads. This is the only place in optic that looks at targets and module classes;
passes ask the view.

Kinds: conv, linear, batch_norm, layer_norm, rms_norm, group_norm, act (``attrs["fn"]`` names
the activation), softmax, matmul, add, sub, mul, div, pow, mean, rsqrt, sqrt, neg, exp, reshape,
flatten, transpose, permute, contiguous, dropout, identity, cast, split, getitem, cat, sdpa, pool
(max/avg/adaptive/lp pooling over the last ``attrs["nd"]`` dims, ``attrs["fn"]`` names it),
resample (interpolate/upsample over the last ``attrs["nd"]`` dims, or all dims after the first two),
pad (``attrs["pad"]``: before/after pairs, last dim first), slice (ATen's ``slice.Tensor``: one dim,
start, end, step), unsqueeze, squeeze.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .graph import fetch_attr

aten = torch.ops.aten


@dataclass
class Const:
    """A constant tensor an op reads: its value, and the get_attr node when the graph holds one."""

    tensor: torch.Tensor | None
    node: fx.Node | None = None


@dataclass
class Op:
    kind: str
    node: fx.Node
    x: Any = None  # the primary data input (a Node, or a scalar for binary ops)
    attrs: dict[str, Any] = field(default_factory=dict)
    consts: dict[str, Const] = field(default_factory=dict)
    other: Any = None  # second operand of binary ops / matmul

    def const(self, name: str) -> torch.Tensor | None:
        c = self.consts.get(name)
        return None if c is None else c.tensor

    @property
    def spelling(self) -> str:
        n = self.node
        if n.op == "call_module":
            return f"module {type(self.attrs.get('_module')).__name__}"
        return f"{n.op} {getattr(n.target, '__name__', n.target)}"


# -- argument tables ------------------------------------------------------------------------
# Each entry: positional parameter names (first one is the data input) and defaults.
_CONV = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
_CONV_T = ["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"]
_CONVOLUTION = ["input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups"]
_BN_F = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
_BN_ATEN = ["input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled"]
_BN_NO_TRAIN = ["input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"]
_LN = ["input", "normalized_shape", "weight", "bias", "eps"]
_RMS = ["input", "normalized_shape", "weight", "eps"]
_GN = ["input", "num_groups", "weight", "bias", "eps"]
_LINEAR = ["input", "weight", "bias"]
_ADDMM = ["bias", "input", "weight_t", "beta", "alpha"]
_SOFTMAX = ["input", "dim", "dtype"]
_ASOFTMAX = ["input", "dim", "half_to_float"]
_BINARY = ["input", "other", "alpha"]
_DROPOUT = ["input", "p", "training"]
_TRANSPOSE = ["input", "dim0", "dim1"]
_SDPA = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]

_DEFAULTS: dict[str, Any] = {
    "bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0,
    "transposed": False, "training": False, "momentum": 0.1, "eps": 1e-5, "weight": None,
    "running_mean": None, "running_var": None, "dtype": None, "alpha": 1, "p": 0.5,
    "attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "beta": 1,
}

# target -> (kind, parameter names, fixed attributes)
_FUNCS: dict[Any, tuple[str, list[str], dict[str, Any]]] = {}


def _reg(kind: str, targets: list[Any], names: list[str], **fixed: Any) -> None:
    for t in targets:
        if t is not None:
            _FUNCS[t] = (kind, names, fixed)


def _a(name: str) -> Any:
    """An aten overload packet by name (None where this torch lacks it)."""
    return getattr(aten, name, None)


for _nd in (1, 2, 3):
    _reg("conv", [getattr(F, f"conv{_nd}d"), getattr(torch, f"conv{_nd}d"), _a(f"conv{_nd}d")], _CONV, transposed=False, nd=_nd)
    _reg("conv", [getattr(F, f"conv_transpose{_nd}d"), getattr(torch, f"conv_transpose{_nd}d"), _a(f"conv_transpose{_nd}d")],
         _CONV_T, transposed=True, nd=_nd)
_reg("conv", [_a("convolution"), _a("_convolution")], _CONVOLUTION)
_reg("linear", [F.linear, _a("linear")], _LINEAR)
_reg("linear", [_a("addmm")], _ADDMM, spelled="addmm")
_reg("batch_norm", [F.batch_norm], _BN_F)
_reg("batch_norm", [torch.batch_norm, _a("batch_norm")], _BN_ATEN)
_reg("batch_norm", [_a("_native_batch_norm_legit_no_training")], _BN_NO_TRAIN, training=False, tuple_out=True)
_reg("layer_norm", [F.layer_norm, torch.layer_norm, _a("layer_norm")], _LN)
_reg("layer_norm", [_a("native_layer_norm")], _LN, tuple_out=True)
_reg("rms_norm", [getattr(F, "rms_norm", None), _a("rms_norm")], _RMS)
_reg("group_norm", [F.group_norm, _a("group_norm")], _GN)
_reg("softmax", [F.softmax, torch.softmax, _a("softmax")], _SOFTMAX)
_reg("softmax", [_a("_softmax")], _ASOFTMAX)
_reg("matmul", [torch.matmul, operator.matmul, _a("matmul"), torch.bmm, _a("bmm"), _a("mm")], ["input", "other"])
_reg("add", [operator.add, operator.iadd, torch.add, _a("add")], _BINARY)
_reg("sub", [operator.sub, operator.isub, torch.sub, _a("sub")], _BINARY)
_reg("mul", [operator.mul, operator.imul, torch.mul, _a("mul")], ["input", "other"])
_reg("div", [operator.truediv, operator.itruediv, torch.div, _a("div")], ["input", "other"])
_reg("pow", [operator.pow, torch.pow, _a("pow")], ["input", "exponent"])
_reg("mean", [torch.mean, _a("mean")], ["input", "dim", "keepdim"])
_reg("rsqrt", [torch.rsqrt, _a("rsqrt")], ["input"])
_reg("sqrt", [torch.sqrt, math.sqrt, _a("sqrt")], ["input"])
_reg("neg", [operator.neg, torch.neg, _a("neg")], ["input"])
_reg("exp", [torch.exp, _a("exp")], ["input"])
_reg("transpose", [torch.transpose, _a("transpose")], _TRANSPOSE)
_reg("permute", [torch.permute, _a("permute")], ["input", "dims"])
_reg("reshape", [torch.reshape, _a("reshape"), _a("view"), _a("_unsafe_view")], ["input", "shape"])
_reg("flatten", [torch.flatten, _a("flatten")], ["input", "start_dim", "end_dim"])
_reg("contiguous", [_a("contiguous")], ["input"])
_reg("dropout", [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout, _a("dropout")], _DROPOUT)
_reg("dropout", [_a("native_dropout")], ["input", "p", "training"], tuple_out=True)
_reg("identity", [_a("alias"), _a("detach"), torch.detach], ["input"])
_reg("cast", [_a("_to_copy"), _a("to")], ["input", "dtype"])
_reg("split", [torch.split, _a("split"), _a("split_with_sizes")], ["input", "split_size", "dim"])
_reg("getitem", [operator.getitem], ["input", "index"])
_reg("cat", [torch.cat, _a("cat")], ["tensors", "dim"])
_reg("masked_fill", [torch.masked_fill, _a("masked_fill")], ["input", "mask", "value"])
_reg("where", [torch.where, _a("where")], ["condition", "input", "other"])
_reg("logical_not", [torch.logical_not, _a("logical_not"), operator.invert], ["input"])
_reg("sdpa", [F.scaled_dot_product_attention, _a("scaled_dot_product_attention")], _SDPA)
_reg("pad", [F.pad, _a("pad")], ["input", "pad", "mode", "value"])
_reg("pad", [_a("constant_pad_nd")], ["input", "pad", "value"])
_reg("slice", [_a("slice")], ["input", "dim", "start", "end", "step"])
_reg("unsqueeze", [torch.unsqueeze, _a("unsqueeze")], ["input", "dim"])
_reg("squeeze", [torch.squeeze, _a("squeeze")], ["input", "dim"])
for _nd in (1, 2, 3):
    for _fn in ("max", "avg", "adaptive_avg", "adaptive_max", "lp"):
        _reg("pool", [getattr(F, f"{_fn}_pool{_nd}d", None), getattr(torch, f"{_fn}_pool{_nd}d", None)], ["input"], fn=_fn, nd=_nd)
        _reg("pool", [_a(f"{_fn}_pool{_nd}d"), _a(f"_{_fn}_pool{_nd}d")], ["input"], fn=_fn, nd=_nd,
             tuple_out=_fn == "adaptive_max")
    _reg("pool", [_a(f"max_pool{_nd}d_with_indices")], ["input"], fn="max", nd=_nd, tuple_out=True)
_reg("resample", [F.interpolate, getattr(F, "upsample", None), getattr(F, "upsample_nearest", None),
                  getattr(F, "upsample_bilinear", None)], ["input"], nd=None)
for _name, _nd in (("upsample_nearest1d", 1), ("upsample_nearest2d", 2), ("upsample_nearest3d", 3),
                   ("_upsample_nearest_exact1d", 1), ("_upsample_nearest_exact2d", 2), ("_upsample_nearest_exact3d", 3),
                   ("upsample_linear1d", 1), ("upsample_bilinear2d", 2), ("upsample_bicubic2d", 2),
                   ("_upsample_bilinear2d_aa", 2), ("upsample_trilinear3d", 3)):
    _reg("resample", [_a(_name)], ["input"], nd=_nd)

_ACT_FUNCS: dict[Any, tuple[str, dict[str, Any]]] = {}


def _act(fn: str, targets: list[Any], **attrs: Any) -> None:
    for t in targets:
        if t is not None:
            _ACT_FUNCS[t] = (fn, attrs)


_act("relu", [F.relu, torch.relu, _a("relu"), torch.relu_, _a("relu_")])
_act("hardtanh", [F.relu6, _a("relu6")], min_val=0.0, max_val=6.0)
_act("hardtanh", [F.hardtanh, _a("hardtanh"), _a("hardtanh_")])
_act("gelu", [F.gelu, _a("gelu")])
_act("silu", [F.silu, _a("silu"), _a("silu_")])
_act("sigmoid", [torch.sigmoid, F.sigmoid, _a("sigmoid")])
_act("tanh", [torch.tanh, F.tanh, _a("tanh")])
_act("leaky_relu", [F.leaky_relu, _a("leaky_relu")])
_act("hardswish", [F.hardswish, _a("hardswish"), _a("hardswish_")])
_act("hardsigmoid", [F.hardsigmoid, _a("hardsigmoid")])
_act("elu", [F.elu, _a("elu")])
_act("mish", [F.mish, _a("mish")])

_ACT_ARGS = {"hardtanh": ["input", "min_val", "max_val"], "leaky_relu": ["input", "negative_slope"],
             "gelu": ["input", "approximate"], "elu": ["input", "alpha"]}
_ACT_DEFAULTS = {"min_val": -1.0, "max_val": 1.0, "negative_slope": 0.01, "approximate": "none", "alpha": 1.0}

# tensor methods: name -> (kind or "act:<fn>", parameter names after self)
_METHODS: dict[str, tuple[str, list[str]]] = {
    "relu": ("act:relu", []), "relu_": ("act:relu", []), "sigmoid": ("act:sigmoid", []),
    "tanh": ("act:tanh", []), "softmax": ("softmax", ["dim", "dtype"]),
    "matmul": ("matmul", ["other"]), "bmm": ("matmul", ["other"]), "add": ("add", ["other", "alpha"]),
    "add_": ("add", ["other", "alpha"]), "sub": ("sub", ["other", "alpha"]), "mul": ("mul", ["other"]),
    "mul_": ("mul", ["other"]), "div": ("div", ["other"]), "pow": ("pow", ["exponent"]),
    "mean": ("mean", ["dim", "keepdim"]), "rsqrt": ("rsqrt", []), "sqrt": ("sqrt", []), "exp": ("exp", []),
    "transpose": ("transpose", ["dim0", "dim1"]), "permute": ("permute", ["*dims"]),
    "view": ("reshape", ["*shape"]), "reshape": ("reshape", ["*shape"]), "flatten": ("flatten", ["start_dim", "end_dim"]),
    "contiguous": ("contiguous", []), "to": ("cast", ["dtype"]), "float": ("cast", []), "type_as": ("cast", ["other"]),
    "split": ("split", ["split_size", "dim"]), "detach": ("identity", []),
    "masked_fill": ("masked_fill", ["mask", "value"]), "logical_not": ("logical_not", []),
    "unsqueeze": ("unsqueeze", ["dim"]), "squeeze": ("squeeze", ["dim"]),
}

_MODULE_ACTS: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "hardtanh", nn.Hardtanh: "hardtanh", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.LeakyReLU: "leaky_relu", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.ELU: "elu", nn.Mish: "mish",
}

_MODULE_POOLS: dict[int, dict[str, type]] = {
    nd: {fn: cls for fn, cls in (("max", getattr(nn, f"MaxPool{nd}d", None)), ("avg", getattr(nn, f"AvgPool{nd}d", None)),
                                 ("adaptive_avg", getattr(nn, f"AdaptiveAvgPool{nd}d", None)),
                                 ("adaptive_max", getattr(nn, f"AdaptiveMaxPool{nd}d", None)),
                                 ("lp", getattr(nn, f"LPPool{nd}d", None))) if cls is not None}
    for nd in (1, 2, 3)}

ELEMENTWISE_KINDS = frozenset({"act", "add", "sub", "mul", "div", "pow", "rsqrt", "sqrt", "neg", "exp", "cast"})
SHAPE_KINDS = frozenset({"reshape", "flatten", "transpose", "permute", "contiguous", "split", "getitem", "cat",
                         "slice", "unsqueeze", "squeeze"})


# -- classification ---------------------------------------------------------------------------
def _bind(names: list[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    bound: dict[str, Any] = {}
    for i, a in enumerate(args):
        if i < len(names):
            if names[i].startswith("*"):
                bound[names[i][1:]] = list(args[i:]) if len(args) - i > 1 or not isinstance(a, list | tuple) else list(a)
                break
            bound[names[i]] = a
    for k, v in kwargs.items():
        bound["input" if k == "self" else k] = v
    return bound


def _const_of(value: Any, gm: fx.GraphModule) -> Const | None:
    """A Const when ``value`` is a constant tensor (get_attr node) or None for an absent optional."""
    if value is None:
        return Const(None)
    if isinstance(value, fx.Node) and value.op == "get_attr":
        t = fetch_attr(gm, value.target)
        return Const(t, value) if isinstance(t, torch.Tensor) else None
    return None


def _module_op(node: fx.Node, gm: fx.GraphModule) -> Op | None:
    mod = gm.get_submodule(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    params = {"weight": Const(getattr(mod, "weight", None)), "bias": Const(getattr(mod, "bias", None))}
    base = {"_module": mod}
    if isinstance(mod, nn.modules.conv._ConvNd):
        nd = len(mod.kernel_size)
        attrs = dict(base, stride=list(mod.stride), padding=mod.padding, dilation=list(mod.dilation),
                     groups=mod.groups, transposed=mod.transposed, output_padding=list(mod.output_padding),
                     nd=nd, padding_mode=mod.padding_mode)
        if isinstance(mod, nn.modules.conv._ConvTransposeNd) and len(node.args) > 1:
            attrs["output_size"] = node.args[1]
        return _finish_conv(Op("conv", node, x, attrs, params))
    if isinstance(mod, nn.Linear):
        return Op("linear", node, x, base, params)
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        uses_batch = mod.training or mod.running_mean is None
        params.update(running_mean=Const(mod.running_mean), running_var=Const(mod.running_var))
        return Op("batch_norm", node, x, dict(base, eps=mod.eps, training=uses_batch, track_running_stats=mod.track_running_stats,
                                              momentum=mod.momentum), params)
    if isinstance(mod, nn.LayerNorm):
        return Op("layer_norm", node, x, dict(base, normalized_shape=list(mod.normalized_shape), eps=mod.eps), params)
    if isinstance(mod, getattr(nn, "RMSNorm", ())):
        return Op("rms_norm", node, x, dict(base, normalized_shape=list(mod.normalized_shape), eps=mod.eps), params)
    if isinstance(mod, nn.GroupNorm):
        return Op("group_norm", node, x, dict(base, num_groups=mod.num_groups, eps=mod.eps), params)
    if type(mod) in _MODULE_ACTS or isinstance(mod, tuple(_MODULE_ACTS)):
        fn = next(v for k, v in _MODULE_ACTS.items() if isinstance(mod, k))
        attrs = dict(base, fn=fn)
        if fn == "hardtanh":
            attrs.update(min_val=float(mod.min_val), max_val=float(mod.max_val))
        elif fn == "leaky_relu":
            attrs["negative_slope"] = mod.negative_slope
        elif fn == "gelu":
            attrs["approximate"] = mod.approximate
        elif fn == "elu":
            attrs["alpha"] = mod.alpha
        return Op("act", node, x, attrs)
    if isinstance(mod, nn.modules.dropout._DropoutNd):
        return Op("dropout", node, x, dict(base, p=mod.p, training=mod.training))
    if isinstance(mod, nn.Identity):
        return Op("identity", node, x, base)
    if isinstance(mod, nn.Softmax):
        return Op("softmax", node, x, dict(base, dim=mod.dim, dtype=None))
    for nd, classes in _MODULE_POOLS.items():
        for fn, cls in classes.items():
            if isinstance(mod, cls):
                return Op("pool", node, x, dict(base, fn=fn, nd=nd))
    if isinstance(mod, nn.Upsample):
        return Op("resample", node, x, dict(base, nd=None))
    if isinstance(mod, nn.Flatten):
        return Op("flatten", node, x, dict(base, start_dim=mod.start_dim, end_dim=mod.end_dim))
    return None


def _finish_conv(op: Op) -> Op:
    w = op.const("weight")
    nd = op.attrs.get("nd") or (w.dim() - 2 if w is not None else None)
    op.attrs["nd"] = nd
    if nd is None:
        return op
    for key in ("stride", "dilation", "output_padding"):
        v = op.attrs.get(key, _DEFAULTS[key])
        op.attrs[key] = [int(v)] * nd if isinstance(v, int) else [int(i) for i in v]
    pad = op.attrs.get("padding", 0)
    if isinstance(pad, str):
        op.attrs["padding_str"] = pad
        pad = _string_padding(pad, w, op.attrs["dilation"])
    op.attrs["padding"] = [int(pad)] * nd if isinstance(pad, int) else (None if pad is None else [int(p) for p in pad])
    return op


def _string_padding(pad: str, w: torch.Tensor | None, dilation: list[int]) -> list[int] | None:
    """'valid' is 0; 'same' is symmetric only when every d·(k−1) is even (None: not expressible)."""
    if pad == "valid":
        return [0] * len(dilation)
    if w is None:
        return None
    total = [d * (k - 1) for d, k in zip(dilation, w.shape[2:], strict=True)]
    return [t // 2 for t in total] if all(t % 2 == 0 for t in total) else None


def _function_op(node: fx.Node, gm: fx.GraphModule, target: Any) -> Op | None:
    key = target if target in _FUNCS or target in _ACT_FUNCS else getattr(target, "overloadpacket", target)
    if key in _ACT_FUNCS:
        fn, fixed = _ACT_FUNCS[key]
        a = _bind(_ACT_ARGS.get(fn, ["input"]), node.args, node.kwargs)
        attrs = {k: a.get(k, fixed.get(k, _ACT_DEFAULTS.get(k))) for k in _ACT_ARGS.get(fn, ["input"])[1:]}
        attrs.update(fixed, fn=fn)
        return Op("act", node, a.get("input"), attrs)
    if key not in _FUNCS:
        return None
    kind, names, fixed = _FUNCS[key]
    a = _bind(names, node.args, node.kwargs)
    attrs = {k: a.get(k, _DEFAULTS.get(k)) for k in names[1:] if k not in ("weight", "bias", "running_mean", "running_var")}
    attrs.update(fixed)
    if kind == "conv":
        op = Op(kind, node, a.get("input"), attrs, {})
        for role in ("weight", "bias"):
            c = _const_of(a.get(role), gm)
            if c is not None:
                op.consts[role] = c
        op.attrs["weight_node"] = a.get("weight")
        return _finish_conv(op)
    if kind == "linear":
        if fixed.get("spelled") == "addmm":
            return _addmm_op(node, gm, a)
        op = Op(kind, node, a.get("input"), attrs)
        for role in ("weight", "bias"):
            c = _const_of(a.get(role), gm)
            if c is not None:
                op.consts[role] = c
        return op
    if kind in ("batch_norm", "layer_norm", "rms_norm", "group_norm"):
        op = Op(kind, node, a.get("input"), attrs)
        for role in ("weight", "bias", "running_mean", "running_var"):
            if role in names:
                c = _const_of(a.get(role, None), gm)
                if c is not None:
                    op.consts[role] = c
        if kind == "batch_norm" and op.consts.get("running_mean", Const(None)).tensor is None:
            op.attrs["training"] = True  # no running statistics: batch statistics are used
        return op
    if kind == "cat":
        return Op(kind, node, a.get("tensors"), attrs)
    x = a.get("input", a.get("query"))
    other = a.get("other", a.get("exponent"))
    if kind in ("masked_fill", "where"):
        attrs["mask"] = a.get("mask", a.get("condition"))
        other = a.get("value", other)
    if kind == "sdpa":
        other = (a.get("key"), a.get("value"))
    return Op(kind, node, x, attrs, other=other)


def _addmm_op(node: fx.Node, gm: fx.GraphModule, a: dict[str, Any]) -> Op | None:
    """``addmm(b, x, Wᵀ)`` with a constant Wᵀ is a linear layer (GPT-2's Conv1D)."""
    wt = _const_of(a.get("weight_t"), gm)
    if wt is None or wt.tensor is None or a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        return None
    op = Op("linear", node, a.get("input"), {"spelled": "addmm"})
    op.consts["weight"] = Const(wt.tensor.t(), wt.node)
    b = _const_of(a.get("bias"), gm)
    if b is None:
        return None
    op.consts["bias"] = b
    return op


def _method_op(node: fx.Node) -> Op | None:
    entry = _METHODS.get(node.target)
    if entry is None:
        return None
    kind, names = entry
    a = _bind(["input", *names], node.args, node.kwargs)
    if kind.startswith("act:"):
        return Op("act", node, a.get("input"), {"fn": kind[4:]})
    attrs = {k.lstrip("*"): a.get(k.lstrip("*"), _DEFAULTS.get(k.lstrip("*"))) for k in names}
    if kind == "masked_fill":
        return Op(kind, node, a.get("input"), attrs, other=a.get("value"))
    if node.target == "float":
        attrs["dtype"] = torch.float32
    return Op(kind, node, a.get("input"), attrs, other=a.get("other", a.get("exponent")))


def view(node: fx.Node, gm: fx.GraphModule) -> Op | None:
    """What ``node`` computes, or None for placeholders, constants, outputs and unknown ops."""
    if node.op == "call_module":
        return _module_op(node, gm)
    if node.op == "call_function":
        return _function_op(node, gm, node.target)
    if node.op == "call_method":
        return _method_op(node)
    return None


def kind_of(node: Any, gm: fx.GraphModule) -> str | None:
    if not isinstance(node, fx.Node):
        return None
    op = view(node, gm)
    return None if op is None else op.kind


def const_value(node: Any, gm: fx.GraphModule) -> torch.Tensor | None:
    """The tensor behind a get_attr node (None for anything else)."""
    c = _const_of(node, gm) if isinstance(node, fx.Node) else None
    return None if c is None else c.tensor


def is_noop(op: Op) -> str | None:
    """Why an op computes its input unchanged (for the cleanup pass), or None."""
    if op.kind == "identity":
        return "identity"
    if op.kind == "dropout" and (not op.attrs.get("training") or op.attrs.get("p") == 0):
        return "dropout in eval mode"
    if op.kind == "contiguous" and op.node.op != "call_module":
        return None  # contiguous changes layout: kept (a backend may rely on it)
    if op.kind == "cast" and isinstance(op.x, fx.Node):
        from .graph import dtype as dtype_of

        src, dst = dtype_of(op.x), dtype_of(op.node)
        extra = set(op.node.kwargs) - {"dtype", "copy", "non_blocking"}
        if src is not None and src == dst and not extra and not op.node.kwargs.get("copy", False) \
                and not any(isinstance(a, str | torch.device) for a in op.node.args[1:]):
            return "cast to the dtype it already has"
    return None
