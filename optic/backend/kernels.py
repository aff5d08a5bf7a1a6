"""Fused kernels and their workloads: what each TIR function made by TVM's fusion computes.

TVM's fusion (LegalizeOps → AnnotateTIROpPattern → FuseOps → FuseTIR) turns every Relax op into a
TIR function, groups them and merges each group into one kernel. The ops inside a kernel are read
from the stages before the merge: the Relax op (name and attributes, e.g. a conv's strides) that
each TIR function was legalized from, and the group FuseOps formed.

A kernel's workload is its main op (the first conv or matmul; else the first reduction; else the
first op of a purely elementwise/injective kernel) with that op's shapes, dtypes and attributes,
the ops fused before it (prologue) and after it (epilogue: ``bias`` and ``residual`` for an add of
a smaller or a same-shaped operand, activations by name), and TVM's structural hash of the kernel's
TIR. :attr:`Workload.key` hashes all of that: two kernels with the same key compute the same thing
on the same shapes, so a tuning database can key on it (with the target).

Op classes: ``matmul`` (matmul, dense, linear), ``conv2d``, ``reduction`` (softmax, layer/group/RMS
norm, mean, sum, max, pooling, ...), ``elementwise`` (elementwise, broadcast and injective ops:
add, activations, reshape, transpose, concat, ...), ``other`` (anything else: other convolutions,
attention, scans, sorting).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..tvm_compat import attrs_dict, require_tvm, structural_hash, tensor_types, value_type

OP_CLASSES = ("matmul", "conv2d", "reduction", "elementwise", "other")

_MATMUL = {"matmul", "dense", "linear", "batch_matmul"}
_REDUCTION = {
    "softmax", "log_softmax", "layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm",
    "mean", "sum", "max", "min", "prod", "variance", "std", "argmax", "argmin", "norm",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
}  # fmt: skip
_INJECTIVE_MAX_PATTERN = 2  # TVM's OpPatternKind: 0 elementwise, 1 broadcast, 2 injective, 3+ not
_ACTIVATION_NAMES = {"gelu_tanh": "gelu"}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.dtype}[{'x'.join(map(str, self.shape))}]"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class OpCall:
    """One op inside a kernel: the Relax op it was legalized from and its tensors."""

    op: str  # "conv2d", "matmul", "add", ... (Relax op name without "relax." / "nn.")
    primfunc: str  # the TIR function LegalizeOps made for it
    pattern: int | None  # TVM's OpPatternKind of that TIR function
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Workload:
    """What a kernel computes, as data: class, main op with shapes/dtypes/attributes, fused ops."""

    op_class: str
    op: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: tuple[tuple[str, Any], ...] = ()
    prologue: tuple[str, ...] = ()
    epilogue: tuple[str, ...] = ()
    tir_hash: int = 0  # TVM's structural hash of the kernel's TIR (names do not enter it)

    @property
    def key(self) -> str:
        """A stable hash of the whole workload: a database key (together with the target)."""
        text = json.dumps(self.as_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [{"shape": list(t.shape), "dtype": t.dtype} for t in self.inputs]
        d["outputs"] = [{"shape": list(t.shape), "dtype": t.dtype} for t in self.outputs]
        d["attrs"] = dict(self.attrs)
        return d

    def __str__(self) -> str:
        text = f"{self.op_class}: {self.op}({', '.join(map(str, self.inputs))}) -> {', '.join(map(str, self.outputs))}"
        if self.prologue:
            text = f"{text}; prologue {'+'.join(self.prologue)}"
        if self.epilogue:
            text = f"{text}; epilogue {'+'.join(self.epilogue)}"
        return text

    def template_args(self) -> tuple[str, tuple, dict[str, Any]] | None:
        """``(template, args, kwargs)`` for ``optic.autotune.templates.template``, or None when no
        template covers this kernel (an op class without one, grouped conv, an unlisted epilogue op)."""
        from optic.autotune.templates import EPILOGUES

        if any(e not in EPILOGUES for e in self.epilogue) or self.prologue:
            return None
        dtype = self.outputs[0].dtype if self.outputs else "float32"
        attrs = dict(self.attrs)
        if self.op_class == "matmul" and len(self.inputs) == 2:
            a, b = self.inputs[0].shape, self.inputs[1].shape
            if len(b) != 2:  # a batched product of two activations: no template for the batch yet
                return None
            return "matmul", (math.prod(a[:-1]), b[-1], a[-1]), {"dtype": dtype, "epilogue": self.epilogue}
        if self.op_class == "conv2d" and attrs.get("groups", 1) == 1 and attrs.get("data_layout", "NCHW") == "NCHW":
            (n, c, h, w), (f, _, r, s) = self.inputs[0].shape, self.inputs[1].shape
            stride, padding, dilation = (_same(attrs.get(k, [v])) for k, v in
                                         (("strides", 1), ("padding", 0), ("dilation", 1)))
            if None in (stride, padding, dilation):
                return None
            return "conv2d", (n, c, h, w, f, r, s), {"stride": stride, "padding": padding, "dilation": dilation,
                                                     "dtype": dtype, "layout": "NCHW", "epilogue": self.epilogue}
        if self.op_class == "reduction" and self.op in ("softmax", "layer_norm"):
            shape = self.inputs[0].shape
            cols = shape[-1] if self.op == "softmax" else math.prod(shape[-len(attrs.get("axes", [-1])):])
            if self.op == "softmax" and attrs.get("axis", -1) not in (-1, len(shape) - 1):
                return None
            kind = "softmax" if self.op == "softmax" else "layernorm"
            return "reduction", (math.prod(shape) // cols, cols), {"kind": kind, "dtype": dtype}
        if self.op_class == "elementwise" and not self.epilogue:
            return "elementwise", (self.outputs[0].numel,), {"dtype": dtype, "inputs": max(len(self.inputs), 1)}
        return None


def _same(values: Any) -> int | None:
    values = values if isinstance(values, list) else [values]
    return values[0] if values and all(v == values[0] for v in values) else None


@dataclass
class Kernel:
    """One fused TIR function and what it computes."""

    name: str
    func: Any = field(repr=False)  # tvm.tirx.PrimFunc
    workload: Workload
    ops: tuple[OpCall, ...]
    callers: tuple[str, ...]  # the Relax functions (partitions) that call it
    calls: int = 1  # how many times one run of the model calls it (identical ops share a kernel)

    @property
    def op_class(self) -> str:
        return self.workload.op_class

    def script(self) -> str:
        """The kernel as TVMScript."""
        return self.func.script()

    def __str__(self) -> str:
        return f"{self.name}: {self.workload}" + (f" (x{self.calls})" if self.calls > 1 else "")


# -- reading the fusion stages ----------------------------------------------------------------------------
def short_op_name(name: str) -> str:
    """``relax.nn.conv2d`` -> ``conv2d``; a TIR function's name without its numeric suffix."""
    if name.startswith("relax."):
        return name.rsplit(".", 1)[-1]
    return re.sub(r"\d+$", "", name)


def op_class(op: str, pattern: int | None) -> str:
    if op == "conv2d":
        return "conv2d"
    if op in _MATMUL:
        return "matmul"
    if op in _REDUCTION:
        return "reduction"
    if pattern is not None and pattern <= _INJECTIVE_MAX_PATTERN:
        return "elementwise"
    return "other"


def _bindings(func: Any):
    for block in func.body.blocks:
        yield from block.bindings


def _functions(mod: Any, kind: Any):
    for gv, func in mod.functions_items():
        if isinstance(func, kind):
            yield gv.name_hint, func


def _call_tir(value: Any) -> Any:
    """The callee GlobalVar of a ``R.call_tir`` call, else None."""
    tvm = require_tvm()
    if isinstance(value, tvm.relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir")):
        return value.args[0]
    return None


def _legalized_from(decomposed: Any, legalized: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """TIR function name -> (Relax op name, attributes) of the op it was legalized from.

    LegalizeOps keeps each binding's variable (the same object; names repeat, so not by name)."""
    tvm = require_tvm()
    relax = tvm.relax
    calls: dict[Any, Any] = {}
    for _, func in _functions(decomposed, relax.Function):
        calls.update((b.var, b.value) for b in _bindings(func)
                     if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op))
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for _, func in _functions(legalized, relax.Function):
        for b in _bindings(func):
            callee = _call_tir(b.value)
            call = calls.get(b.var)
            if callee is not None and call is not None:
                out.setdefault(callee.name_hint, (call.op.name, attrs_dict(call.attrs)))
    return out


class _Site:
    """A call_tir inside a Relax function: its OpCall and the variables it reads and writes."""

    def __init__(self, call: OpCall, args: list[Any], out: Any):
        self.call, self.args, self.out = call, args, out


def _site(b: Any, mod: Any, origin: dict[str, tuple[str, dict[str, Any]]]) -> _Site | None:
    callee = _call_tir(b.value)
    if callee is None:
        return None
    name = callee.name_hint
    op, attrs = origin.get(name, (name, {}))
    func = mod[name] if name in {gv.name_hint for gv in mod.get_global_vars()} else None
    pattern = func.attrs.get("op_pattern") if func is not None and func.attrs is not None else None
    args = list(b.value.args[1].fields)
    inputs = tuple(TensorSpec(*t) for a in args for t in tensor_types(value_type(a)))
    outputs = tuple(TensorSpec(*t) for t in tensor_types(value_type(b.var)))
    call = OpCall(short_op_name(op), name, None if pattern is None else int(pattern), inputs, outputs, attrs)
    return _Site(call, args, b.var)


def extract_kernels(decomposed: Any, legalized: Any, grouped: Any, fused: Any) -> list[Kernel]:
    """The kernels of ``fused`` (after FuseTIR) with their workloads, in call order.

    ``decomposed``: the Relax module before LegalizeOps; ``legalized``: after LegalizeOps and
    AnnotateTIROpPattern; ``grouped``: after FuseOps, before FuseTIR.
    """
    tvm = require_tvm()
    relax, tirx = tvm.relax, tvm.tirx
    origin = _legalized_from(decomposed, legalized)
    groups: dict[str, list[_Site]] = {}
    for name, func in _functions(grouped, relax.Function):
        if func.attrs is not None and "Primitive" in func.attrs:
            groups[name] = [s for b in _bindings(func) if (s := _site(b, legalized, origin)) is not None]

    calls: dict[str, list[str]] = {}  # kernel -> callers, in call order
    count: dict[str, int] = {}
    singles: dict[str, _Site] = {}
    for caller, func in _functions(fused, relax.Function):
        for b in _bindings(func):
            site = _site(b, legalized, origin)
            if site is None:
                continue
            calls.setdefault(site.call.primfunc, [])
            count[site.call.primfunc] = count.get(site.call.primfunc, 0) + 1
            if caller not in calls[site.call.primfunc]:
                calls[site.call.primfunc].append(caller)
            singles.setdefault(site.call.primfunc, site)

    prims = dict(_functions(fused, tirx.PrimFunc))
    kernels = []
    for name, callers in calls.items():
        if name not in prims:
            continue
        sites = groups.get(name) or [singles[name]]
        func = prims[name]
        kernels.append(Kernel(name, func, _workload(sites, func), tuple(s.call for s in sites), tuple(callers),
                              count[name]))
    return kernels


def _workload(sites: list[_Site], func: Any) -> Workload:
    ranks = [_rank(s.call) for s in sites]
    main = ranks.index(max(ranks))
    m = sites[main].call
    cls = op_class(m.op, m.pattern)
    if all(op_class(s.call.op, s.call.pattern) == "elementwise" for s in sites):
        cls, main, m = "elementwise", 0, sites[0].call
    chain = [sites[main].out]
    epilogue = []
    for s in sites[main + 1:]:
        epilogue.append(_epilogue_name(s, chain))
        chain.append(s.out)
    attrs = tuple(sorted((k, v) for k, v in m.attrs.items()))
    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return Workload(cls, m.op, m.inputs, m.outputs, attrs, tuple(s.call.op for s in sites[:main]),
                    tuple(epilogue), structural_hash(func))


def _rank(call: OpCall) -> int:
    cls = op_class(call.op, call.pattern)
    return {"conv2d": 3, "matmul": 3, "reduction": 2, "other": 1}.get(cls, 0)


def _epilogue_name(site: _Site, chain: list[Any]) -> str:
    op = _ACTIVATION_NAMES.get(site.call.op, site.call.op)
    if op != "add" or len(site.args) != 2:
        return op
    ins = [any(a.same_as(c) for c in chain) for a in site.args]
    if ins.count(True) != 1:
        return op
    other = site.call.inputs[1 if ins[0] else 0]
    return "residual" if other.shape == site.call.outputs[0].shape else "bias"
