"""tvm_graph: the whole graph as one TVM program of optic's own kernels, run by Relax's VM in one call.

The other whole-graph implementations (:mod:`.whole`) hand the graph to Inductor, whose convolutions are
oneDNN's through PyTorch's per-call wrapper (a primitive looked up in two caches and an output allocated
on every call: about a third of MobileNetV2's batch-1 time on this CPU went there). This one lowers the
graph itself, op by op, to a Relax function whose every kernel is TIR that optic generated:

- **one activation layout for the conv chain**: every 4-D value a convolution makes is NHWC; a value is
  transposed back to the model's NCHW only where a consumer needs it (an op without an NHWC kernel, the
  graph's outputs) and input images are transposed once, on entry. A 4-D value with H = W = 1 is the same
  memory in both layouts and is never copied.
- **kernels from the templates, tuned like any other**: a 1x1, stride-1 convolution is the GEMM template
  over ``[N*H*W, C] x [C, F]`` and a linear the GEMM template, their weights packed into its micro-panels
  at build time (``b_layout="packed"``); a depthwise convolution is the depthwise template (weights
  ``[R, S, C]``); any other dense convolution the direct template on NHWC (``NHWCc``) or the implicit GEMM,
  whichever is expected faster. Each one's bias, activation (ReLU, ReLU6, GELU, SiLU, tanh, sigmoid) and
  residual add run in its write-back. Configurations come from the tuning database (``tune`` measurements
  per distinct kernel; 0: the database's best, else the cost model's first choice).
- **the small ops between them** (pooling, padding, concatenation, elementwise ops that did not fuse,
  layout transposes, the global average) are generated here as simple parallel, vectorized loops.
- **a quantized graph's int8 layers** (``optic::int8_conv2d`` / ``int8_linear``) are :mod:`.int8_amx`'s
  VNNI (or AMX) kernels with their fused epilogues (:func:`.int8_amx.use_kernels`: the residual add, the
  ReLU, the next layer's quantize step), on the program's NHWC tensors, every core, the batch fixed; the
  quantize and dequantize steps left are simple loops. uint8 values flow between int8 layers; a float op
  never reads one (declined).
- **a transformer's other ops** (LayerNorm over the last dimension, softmax, the attention products or
  ``scaled_dot_product_attention`` without mask, transposes, splits, means over any dims) are row-wise
  kernels: the rows over the cores, each row's statistics computed inside the row loop.

Graphs with an op this does not cover are declined with the op named (the CPU step keeps the other
implementations). The program serves the example's shapes and dtypes only; every other call (another
shape, gradients, tracing, another device, a weight changed after the build) goes to Inductor's
whole-graph program, made on the first such call, or the plain graph where nothing compiled may serve,
so a caller never sees a wrong result. The built library travels with the module (pickle, deepcopy) and is
rebuilt from the stored configurations on a machine of another kind.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from optic import ir
from optic.ir.opview import Op, view
from optic.tvm_compat import aligned

from .generated import _reaches, _uniform
from .lower import _Recorder
from .whole import _FrozenGraph, error_line, inputs_seen

NAME = "whole graph on TVM (optic's kernels)"
log = logging.getLogger("optic")
VECTOR = 16  # fp32 lanes the simple kernels' inner loops are vectorized by
PARALLEL_MIN = 1 << 14  # elements from which a simple kernel runs on every core
_EPILOGUE_ACTS = {"relu", "gelu", "silu", "tanh", "sigmoid"}
# B of a GEMM whose weights are constants: packed in its micro-panels once, at build time (measured on Zen 5:
# MobileNetV2's classifier 0.026 against 0.059 ms, its 12544x96x16 conv 0.117 against 0.167, the other
# 1x1 convolutions 2-13 % faster than packing per call); "kn" packs per call (kept for A/B runs)
GEMM_WEIGHTS = "packed"


class Unsupported(Exception):
    """The graph has something this implementation does not compile; the message names it."""


def unavailable() -> str | None:
    """Why the implementation cannot be built here, or None."""
    try:
        from optic.tvm_compat import require_tvm

        require_tvm()
    except Exception as e:  # noqa: BLE001 - any import failure means the same: not offered
        return f"TVM is not usable here ({error_line(e, 120)})"
    return None


_KINDS = frozenset({"conv", "linear", "act", "add", "sub", "mul", "div", "flatten", "reshape", "mean", "pool",
                    "identity", "contiguous", "dropout", "pad", "cat", "layer_norm", "softmax", "matmul", "transpose",
                    "permute", "unsqueeze", "squeeze", "split", "getitem", "sdpa"})


def check(gm: fx.GraphModule) -> str | None:
    """Why the graph cannot be compiled here, from its ops alone (the first one without a kernel), or None.
    Cheap: what only the shapes tell is found while lowering."""
    from . import int8

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sizes: set[fx.Node] = set()  # shape queries, and arithmetic on them only: constants of the example's shapes
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if ir.graph.is_shape_query(node) or (node.op == "call_function" and node.all_input_nodes
                                             and all(a in sizes for a in node.all_input_nodes)):
            sizes.add(node)
            continue
        if node.op == "call_function" and node.target in (int8.quantize_u8, int8.dequantize_u8):
            continue
        if node.op == "call_function" and node.target in int8.OUT_ARGS:
            why = _int8_uncovered(node)
            if why:
                return f"'{node.name}': {why}"
            continue
        op = view(node, gm)
        kind = None if op is None else op.kind
        if kind not in _KINDS:
            what = kind or f"{node.op} {getattr(node.target, '__name__', node.target)}"
            return f"'{node.name}' ({what}) has no kernel in the TVM program"
        # the program computes every op out of place: an in-place op whose input is read again after it
        # (where PyTorch would read the changed tensor) is not the same computation
        mutates = ir.is_inplace(node) or (node.op == "call_module"
                                          and getattr(ir.fetch_attr(gm, node.target), "inplace", False) is True)
        target = node.args[0] if node.args else None
        if mutates and isinstance(target, fx.Node) and any(
                u is not node and order[u] > order[node] for u in target.users):
            return (f"'{node.name}' changes '{target.name}' in place, and '{target.name}' is read again after it "
                    "(the TVM program computes out of place)")
    return None


def _int8_uncovered(node: fx.Node) -> str | None:
    """Why the int8 layer ``node`` (``optic::int8_conv2d`` or ``int8_linear``) has no kernel here, or None."""
    from . import int8_amx

    why = int8_amx.unavailable()
    if why:
        return f"an int8 layer, and optic's int8 kernels cannot run here ({why})"
    why = int8_amx.uncovered(node)
    return f"an int8 layer: {why}" if why else None


class _KernelShapes(_Recorder):
    """The values of a graph whose int8 layers are :mod:`.int8_amx` modules, for their shapes and dtypes: an
    int8 module gives an empty tensor of its output's shape and dtype (nothing compiled or run)."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        from . import int8_amx

        mod = ir.fetch_attr(self.module, target)
        x = args[0]
        if isinstance(mod, int8_amx.Quantize):
            return torch.empty(x.shape, dtype=torch.uint8)
        if isinstance(mod, int8_amx.Int8Kernel):
            dtype = torch.uint8 if mod.out_u8 else torch.float32
            if not mod.conv:
                return torch.empty((*x.shape[:-1], mod.f), dtype=dtype)
            n, _, h, w = x.shape
            step = getattr(mod, "subsample", 1)
            return torch.empty((n, mod.f, *mod.out_hw(-(-h // step), -(-w // step))), dtype=dtype)
        return super().call_module(target, args, kwargs)


def _with_int8_kernels(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` where it has no int8 layer; else a copy (sharing ``gm``'s tensors) whose int8 layers are
    :mod:`.int8_amx` kernels with their epilogues fused (:func:`.int8_amx.use_kernels`)."""
    from . import int8, int8_amx

    if not int8.rounds(gm):
        return gm
    import copy

    graph = copy.deepcopy(gm.graph)
    new = fx.GraphModule(gm, graph)
    int8_amx.use_kernels(new, 0)
    return new


@dataclass
class _V:
    """A tensor value of the graph being lowered: its Relax expression, its PyTorch (logical) shape, and
    whether it is stored NHWC (4-D only)."""

    expr: Any
    shape: tuple[int, ...]
    nhwc: bool = False
    dtype: str = "float32"  # or "uint8": an int8 layer's quantized output (a quantized graph's)


@dataclass
class KernelInfo:
    """One kernel of the built program, for the report."""

    name: str
    what: str  # the operator (template kernels) or the op the simple kernel computes
    source: str  # "template" or "simple"
    config: dict[str, int] = field(default_factory=dict)
    predicted_s: float | None = None
    measured_s: float | None = None
    nodes: list[str] = field(default_factory=list)
    spec: dict[str, Any] | None = None  # the template kernel's operator (Operator.as_dict), to tune or rank it

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "what": self.what, "source": self.source, "config": self.config,
                "predicted_ms": None if self.predicted_s is None else round(self.predicted_s * 1e3, 4),
                "measured_ms": None if self.measured_s is None else round(self.measured_s * 1e3, 4),
                "nodes": self.nodes}


def _ints(value: Any, n: int = 2) -> tuple[int, ...] | None:
    vals = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(vals) == 1:
        vals = vals * n
    if len(vals) != n or any(not isinstance(v, int) for v in vals):
        return None
    return tuple(int(v) for v in vals)


_POOL_ARGS = {
    "max": ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"],
    "avg": ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
    "adaptive_avg": ["input", "output_size"],
}


def _pool_params(op: Op) -> dict[str, Any]:
    fn = op.attrs["fn"]
    if fn not in _POOL_ARGS or op.attrs.get("nd") != 2 or op.attrs.get("tuple_out"):
        raise Unsupported(f"{fn} pooling over {op.attrs.get('nd')} dims has no kernel here")
    node = op.node
    if node.op == "call_module":
        mod = op.attrs["_module"]
        if getattr(mod, "return_indices", False):
            raise Unsupported(f"'{node.name}': pooling that also returns its indices")
        got = {k: getattr(mod, k) for k in _POOL_ARGS[fn][1:] if hasattr(mod, k)}
    else:
        got = dict(zip(_POOL_ARGS[fn], node.args, strict=False))
        got.update(node.kwargs)
        got.pop("input", None)
    if fn == "adaptive_avg":
        return {"output_size": _ints(got.get("output_size"))}
    k = _ints(got.get("kernel_size"))
    stride = got.get("stride")
    s = k if stride in (None, [], ()) else _ints(stride)
    return {"kernel": k, "stride": s, "padding": _ints(got.get("padding", 0)), "dilation": _ints(got.get("dilation", 1)),
            "ceil_mode": bool(got.get("ceil_mode", False)), "count_include_pad": bool(got.get("count_include_pad", True)),
            "divisor_override": got.get("divisor_override")}


class _Lowering:
    """Walks the flat graph in order and emits one Relax function (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, example: tuple, trials: int, db: Any, budget_s: float = math.inf,
                 progress: Any = None):  # db: a TuningDB, opened once for the whole lowering
        from optic.tvm_compat import require_tvm

        self.tvm = tvm = require_tvm()
        self.gm, self.trials, self.db, self.progress = gm, trials, db, progress
        self.deadline = time.perf_counter() + budget_s
        self.runner: Any = None  # one measuring worker for every kernel tuned (started on the first)
        self.measurements = 0
        self.bb = tvm.relax.BlockBuilder()
        self.env: dict[fx.Node, Any] = {}
        self.kernels: list[KernelInfo] = []
        recorder = _KernelShapes(gm)
        with torch.no_grad():
            recorder.run(*example)
        self.shapes = recorder.values  # every node's value on the example
        self.dense_nodes: int | None = None  # conv/linear nodes: the progress bar's length, counted when shown
        self.deferred: dict[fx.Node, tuple[Op, list[fx.Node], tuple[str, ...], fx.Node | None]] = {}
        self.skip: set[fx.Node] = set()
        self.configs: dict[str, tuple[dict[str, int], Any]] = {}  # operator key -> (config, tune result)
        self.converted: dict[tuple[int, bool], _V] = {}  # (value's expression, to NHWC) -> the value transposed

    # -- shapes ----------------------------------------------------------------------------------------
    def _shape(self, node: Any) -> tuple[int, ...]:
        v = self.shapes.get(node)
        if not isinstance(v, torch.Tensor):
            raise Unsupported(f"'{getattr(node, 'name', node)}' is not a tensor")
        if v.dtype not in (torch.float32, torch.uint8):
            raise Unsupported(f"'{node.name}' is {v.dtype}; only float32 graphs (and their int8 layers' uint8 "
                              "values) are compiled here")
        return tuple(v.shape)

    # -- emitting --------------------------------------------------------------------------------------
    def _add(self, func: Any, name: str) -> Any:
        name = f"{name}_{len(self.kernels)}"
        return self.bb.add_func(func.with_attr("global_symbol", name), name), name

    def _call(self, func: Any, name: str, args: list[Any], out_shape: tuple[int, ...], info: KernelInfo,
              dtype: str = "float32", scratch: tuple[tuple[int, ...], str] | None = None) -> Any:
        """A call of ``func`` on ``args``; its output of ``out_shape`` and ``dtype``. ``scratch``: the kernel's
        last parameter is a buffer of its own of this (shape, dtype), which the VM allocates (and reuses)."""
        gv, fname = self._add(func, name)
        info.name = fname
        self.kernels.append(info)
        relax = self.tvm.relax
        out = relax.TensorType(list(out_shape), dtype)
        if scratch is None:
            return self.bb.emit(relax.call_tir(gv, args, out))
        both = self.bb.emit(relax.call_tir(gv, args, [out, relax.TensorType(list(scratch[0]), scratch[1])]))
        return self.bb.emit(relax.TupleGetItem(both, 0))

    def _reshape(self, expr: Any, shape: tuple[int, ...]) -> Any:
        return self.bb.emit(self.tvm.relax.op.reshape(expr, list(shape)))

    def _const(self, t: torch.Tensor, keep_dtype: bool = False) -> Any:
        t = t.detach() if keep_dtype else t.detach().float()
        return self.tvm.relax.const(t.contiguous().numpy())

    def _simple(self, name: str, inputs: list[tuple[Any, ...]], compute: Any, out_shape: tuple[int, ...],
                what: str, nodes: list[fx.Node], schedule: Any = None) -> Any:
        """A kernel generated here: ``compute(*placeholders)`` -> a TE tensor of ``out_shape`` (its dtype the
        output's). ``inputs``: (expression, shape[, dtype]) each, float32 unless said."""
        te = self.tvm.te
        phs = [te.placeholder(i[1], name=f"x{k}", dtype=i[2] if len(i) > 2 else "float32")
               for k, i in enumerate(inputs)]
        out = compute(*phs)
        func = te.create_prim_func([*phs, out])
        sch = self.tvm.s_tir.Schedule(func)
        (schedule or _schedule_elementwise)(self.tvm, sch, out_shape)
        info = KernelInfo("", what, "simple", nodes=[n.name for n in nodes])
        return self._call(sch.mod["main"], name, [i[0] for i in inputs], out_shape, info, dtype=str(out.dtype))

    def _tuned(self, operator: Any) -> tuple[dict[str, int], Any]:
        """``operator``'s configuration and tuning result (tuned once per distinct operator)."""
        from optic.autotune.tune import tune

        key = operator.key
        if key not in self.configs:
            trials = self.trials if time.perf_counter() < self.deadline else 0
            if trials and self.runner is None:
                from optic.autotune.measure import Runner

                self.runner = Runner()
                self.runner.spawn()
            if self.progress is not None and trials:
                if self.dense_nodes is None:
                    self.dense_nodes = sum(1 for nd in self.gm.graph.nodes if nd.op != "placeholder"
                                           and getattr(view(nd, self.gm), "kind", None) in ("conv", "linear"))
                self.progress(f"tuning {operator}; kernels", len(self.configs),
                              max(self.dense_nodes, len(self.configs) + 1))
            result = tune(operator, "cpu", trials=trials, db=self.db, runner=self.runner)
            self.measurements += result.measurements
            self.configs[key] = (result.config, result)
        return self.configs[key]

    @staticmethod
    def _expected_s(result: Any) -> float:
        return result.seconds if result.seconds is not None else result.predicted_seconds

    def _template(self, operators: list[Any], args: list[Any], nodes: list[fx.Node],
                  weight: torch.Tensor | None = None) -> Any:
        """A call of the fastest of ``operators`` (alternative templates of one kernel: measured time where
        tuning measured them, else the cost model's), its inputs ``args``; ``weight`` (when given) is its
        second input, packed for the configuration where the template packs it (a direct convolution, a
        GEMM with ``b_layout="packed"``)."""
        from .codegen_cpu import build, pack_direct_weight, pack_gemm_weight

        tuned = [(op, *self._tuned(op)) for op in operators]
        operator, config, result = min(tuned, key=lambda t: self._expected_s(t[2]))
        if weight is not None:  # the weights as this template takes them, packed once for its configuration
            packed = (pack_direct_weight(weight, operator, config) if operator.direct else
                      pack_gemm_weight(weight, operator, config) if operator.packed_b else weight)
            args = [args[0], self._const(packed), *args[1:]]
        func = build(operator, config)["main"]
        info = KernelInfo("", str(operator), "template", dict(config), result.predicted_seconds,
                          result.seconds, [n.name for n in nodes], operator.as_dict())
        if len(tuned) > 1:
            info.what += " (chosen over " + ", ".join(
                f"{o.opts.get('layout')} {self._expected_s(r) * 1e3:.3f} ms" for o, _, r in tuned if o is not operator) + ")"
        return self._call(func, operator.op, args, operator.out_shape, info)

    # -- layouts ---------------------------------------------------------------------------------------
    def _nhwc(self, v: _V, node: fx.Node) -> _V:
        if v.nhwc:
            return v
        if len(v.shape) != 4:
            raise Unsupported(f"'{node.name}' needs a 4-D input")
        key = (id(v.expr), True)
        if key not in self.converted:  # a value several consumers need in the other layout: transposed once
            self.converted[key] = self._to_nhwc(v, node)
        return self.converted[key]

    def _to_nhwc(self, v: _V, node: fx.Node) -> _V:
        n, c, h, w = v.shape
        if h == 1 and w == 1:  # the same memory in both layouts
            return _V(self._reshape(v.expr, (n, 1, 1, c)), v.shape, True, v.dtype)
        expr = self._simple("to_nhwc", [(v.expr, v.shape, v.dtype)], lambda x: self.tvm.te.compute(
            (n, h, w, c), lambda a, b, d, e: x[a, e, b, d], name="T"), (n, h, w, c), "NCHW -> NHWC", [node],
            _schedule_transpose)
        return _V(expr, v.shape, True, v.dtype)

    def _logical(self, v: _V, node: fx.Node) -> _V:
        if not v.nhwc:
            return v
        key = (id(v.expr), False)
        if key not in self.converted:
            self.converted[key] = self._to_logical(v, node)
        return self.converted[key]

    def _to_logical(self, v: _V, node: fx.Node) -> _V:
        n, c, h, w = v.shape
        if h == 1 and w == 1:
            return _V(self._reshape(v.expr, v.shape), v.shape, False, v.dtype)
        expr = self._simple("to_nchw", [(v.expr, (n, h, w, c), v.dtype)], lambda x: self.tvm.te.compute(
            (n, c, h, w), lambda a, e, b, d: x[a, b, d, e], name="T"), (n, c, h, w), "NHWC -> NCHW", [node],
            _schedule_transpose)
        return _V(expr, v.shape, False, v.dtype)

    @staticmethod
    def _stored(v: _V) -> tuple[int, ...]:
        """``v``'s shape as its memory holds it (NHWC for an NHWC value)."""
        if not v.nhwc:
            return v.shape
        n, c, h, w = v.shape
        return n, h, w, c

    def _value(self, a: Any, node: fx.Node, uint8: bool = False) -> _V:
        """``a``'s value as ``node`` reads it; ``uint8``: ``node`` takes a quantized value too (else float32 only)."""
        if isinstance(a, fx.Node):
            got = self.env.get(a)
            if got is None:
                raise Unsupported(f"'{node.name}' reads '{a.name}', which has no value here")
            if isinstance(got, torch.Tensor):
                if got.dtype != torch.float32:
                    raise Unsupported(f"'{node.name}' reads the {got.dtype} constant '{a.name}'; only float32 "
                                      "graphs are compiled here")
                return _V(self._const(got), tuple(got.shape))
            if got.dtype != "float32" and not uint8:
                raise Unsupported(f"'{node.name}' reads the {got.dtype} value '{a.name}' (no {got.dtype} kernel "
                                  "for it here)")
            return got
        raise Unsupported(f"'{node.name}' takes {type(a).__name__} where a tensor is expected")

    # -- the walk --------------------------------------------------------------------------------------
    def run(self, placeholders: list[fx.Node]) -> Any:
        relax = self.tvm.relax
        params = []
        for p in placeholders:
            shape = self._shape(p)
            var = relax.Var(p.name, relax.TensorType(list(shape), "float32"))
            params.append(var)
            self.env[p] = _V(var, shape)
        with self.bb.function("main", params):
            with self.bb.dataflow():
                outs = None
                for node in self.gm.graph.nodes:
                    if node.op == "placeholder":
                        continue
                    if node.op == "output":
                        outs = self._outputs(node)
                        break
                    self._node(node)
                out = self.bb.emit_output(outs)
            self.bb.emit_func_output(out)
        return self.bb.get()

    def _outputs(self, node: fx.Node) -> Any:
        leaves = node.args[0]
        single = isinstance(leaves, fx.Node)
        items = [leaves] if single else list(leaves)
        exprs = []
        for leaf in items:
            if not isinstance(leaf, fx.Node):
                raise Unsupported(f"the graph returns a {type(leaf).__name__}, not a tensor")
            v = self._logical(self._value(leaf, node), node)
            exprs.append(v.expr)
        self.single = single
        return exprs[0] if single else self.tvm.relax.Tuple(exprs)

    def _node(self, node: fx.Node) -> None:
        if node.op == "get_attr":
            t = ir.fetch_attr(self.gm, node.target)
            if isinstance(t, torch.Tensor):
                self.env[node] = t
            return
        if node in self.deferred:
            self._dense(*self.deferred.pop(node))
            return
        if node in self.skip:
            return
        got = self.shapes.get(node, None)
        if isinstance(got, int | float | bool | torch.Size) or (
                isinstance(got, tuple) and got and all(isinstance(v, int) for v in got)):
            self.env[node] = got  # a shape query or arithmetic on one: a constant of the example's shapes
            return
        if self._int8(node):
            return
        op = view(node, self.gm)
        if op is None:
            raise Unsupported(f"'{node.name}' ({node.op} {getattr(node.target, '__name__', node.target)}) is not an "
                              "op optic knows")
        handler = getattr(self, f"_op_{op.kind}", None)
        if handler is None:
            raise Unsupported(f"'{node.name}' ({op.kind}) has no kernel here")
        handler(op)

    # -- conv / linear with their epilogue -------------------------------------------------------------
    def _epilogue_act(self, op: Op | None, x: fx.Node) -> str | None:
        if op is None or op.kind != "act" or op.x is not x:
            return None
        fn = op.attrs.get("fn")
        if fn == "hardtanh" and float(op.attrs.get("min_val", -1.0)) == 0.0 and float(op.attrs.get("max_val", 1.0)) == 6.0:
            return "relu6"
        if fn == "gelu" and op.attrs.get("approximate", "none") != "none":
            return None
        return fn if fn in _EPILOGUE_ACTS else None

    def _single_user(self, node: fx.Node) -> Op | None:
        users = list(node.users)
        if len(users) != 1 or ir.is_inplace(users[0]) or users[0].op == "output":
            return None
        return view(users[0], self.gm)

    def _chain(self, op: Op) -> tuple[list[fx.Node], tuple[str, ...], fx.Node | None]:
        nodes, epi, residual = [op.node], [], None
        if op.const("bias") is not None:
            epi.append("bias")
        while True:
            nxt = self._single_user(nodes[-1])
            if nxt is not None and nxt.node in self.skip | set(self.deferred):
                break  # already in an earlier kernel's epilogue (a ResNet block's add: both convs end in it)
            act = self._epilogue_act(nxt, nodes[-1])
            if act and not any(e not in ("bias", "residual") for e in epi):
                epi.append(act)
                nodes.append(nxt.node)
                continue
            if residual is None and nxt is not None and nxt.kind == "add" and nxt.attrs.get("alpha", 1) == 1 \
                    and not any(e not in ("bias",) for e in epi):
                a, b = (nxt.node.args[:2] if len(nxt.node.args) >= 2 else (nxt.x, nxt.other))
                other = b if a is nodes[-1] else a if b is nodes[-1] else None
                if isinstance(other, fx.Node) and other is not nodes[-1] and other not in self.skip \
                        and isinstance(self.shapes.get(other), torch.Tensor) \
                        and tuple(self.shapes[other].shape) == tuple(self.shapes[nodes[-1]].shape) \
                        and self.shapes[other].dtype == torch.float32 and not _reaches(other, nodes):
                    residual = other
                    epi.append("residual")
                    nodes.append(nxt.node)
                    continue
            break
        return nodes, tuple(epi), residual

    def _op_conv(self, op: Op) -> None:
        self._defer(op)

    def _op_linear(self, op: Op) -> None:
        self._defer(op)

    def _defer(self, op: Op) -> None:
        nodes, epi, residual = self._chain(op)
        self.skip.update(nodes[1:-1])
        if len(nodes) == 1:
            self._dense(op, nodes, epi, residual)
        else:  # emitted at the chain's last node, where the residual (computed in between) has its value
            self.deferred[nodes[-1]] = (op, nodes, epi, residual)

    def _dense(self, op: Op, nodes: list[fx.Node], epi: tuple[str, ...], residual: fx.Node | None) -> None:
        from optic.autotune import Operator, SpaceError

        node = op.node
        w, b = op.const("weight"), op.const("bias")
        if w is None:
            raise Unsupported(f"'{node.name}': its weight is not a constant")
        x = self._value(op.x, node)
        res = self._value(residual, node) if residual is not None else None
        try:
            if op.kind == "linear":
                out = self._linear(op, x, w, b, epi, res, nodes, Operator)
            else:
                out = self._conv(op, x, w, b, epi, res, nodes, Operator)
        except SpaceError as e:
            raise Unsupported(f"'{node.name}': {e}") from None
        self.env[nodes[-1]] = out

    def _linear(self, op: Op, x: _V, w: torch.Tensor, b: Any, epi: tuple, res: _V | None, nodes: list, Operator: Any) -> _V:
        if x.nhwc:
            x = self._logical(x, op.node)
        n_out, k = w.shape
        m = math.prod(x.shape[:-1])
        operator = Operator("matmul", (m, n_out, k), b_layout=GEMM_WEIGHTS, epilogue=epi)
        args = [self._reshape(x.expr, (m, k))]
        if b is not None:
            args.append(self._const(b))
        out_shape = (*x.shape[:-1], n_out)
        if res is not None:
            res = self._logical(res, op.node)
            args.append(self._reshape(res.expr, (m, n_out)))
        y = self._template([operator], args, nodes, weight=w.t())
        return _V(self._reshape(y, out_shape), out_shape)

    def _conv(self, op: Op, x: _V, w: torch.Tensor, b: Any, epi: tuple, res: _V | None, nodes: list, Operator: Any) -> _V:
        a = op.attrs
        if a.get("nd") != 2 or a.get("transposed") or a.get("padding_mode", "zeros") != "zeros" or len(x.shape) != 4:
            raise Unsupported(f"'{op.node.name}': only 2-D, non-transposed, zero-padded convolutions have kernels here")
        stride, padding, dilation = (_uniform(a.get(k)) for k in ("stride", "padding", "dilation"))
        if None in (stride, padding, dilation):
            raise Unsupported(f"'{op.node.name}': stride, padding or dilation differ between H and W")
        groups = int(a.get("groups", 1))
        n, c, h, wd = x.shape
        f, cg, r, s = w.shape
        x = self._nhwc(x, op.node)
        out_shape = self._shape(nodes[-1])  # logical (N, F, OH, OW)
        _, _, oh, ow = out_shape
        if groups == 1 and r == s == 1 and stride == 1 and padding == 0:
            m = n * h * wd
            operator = [Operator("matmul", (m, f, c), b_layout=GEMM_WEIGHTS, epilogue=epi)]
            args = [self._reshape(x.expr, (m, c))]
            weight = w.reshape(f, c).t()
            shape2 = (m, f)
        elif groups == 1:
            # computed directly on channel blocks (weights packed for the configuration), or as an implicit
            # GEMM (im2col blocks gathered per tile): whichever is expected faster
            operator = [Operator("conv2d", (n, c, h, wd, f, r, s), stride=stride, padding=padding, dilation=dilation,
                                 epilogue=epi, layout=layout) for layout in ("NHWCc", "NHWC")]
            args, weight = [x.expr], w
            shape2 = None
        elif groups == c == f and cg == 1:
            operator = [Operator("depthwise_conv2d", (n, c, h, wd, r, s), stride=stride, padding=padding,
                                 dilation=dilation, epilogue=epi)]
            args, weight = [x.expr], w[:, 0].permute(1, 2, 0)
            shape2 = None
        else:
            raise Unsupported(f"'{op.node.name}': a grouped convolution ({groups} groups) that is not depthwise")
        if b is not None:
            args.append(self._const(b))
        if res is not None:
            res = self._nhwc(res, op.node)
            args.append(res.expr if shape2 is None else self._reshape(res.expr, shape2))
        y = self._template(operator, args, nodes, weight=weight)
        if shape2 is not None:
            y = self._reshape(y, (n, oh, ow, f))
        return _V(y, out_shape, True)

    # -- int8 layers (a quantized graph, its layers as :mod:`.int8_amx` kernels) --------------------------
    def _int8(self, node: fx.Node) -> bool:
        """Emit ``node`` if it is an int8 layer's kernel, a quantize or a dequantize step; whether it was."""
        from . import int8, int8_amx

        if node.op == "call_module":
            mod = ir.fetch_attr(self.gm, node.target)
            if isinstance(mod, int8_amx.Int8Kernel):
                self._int8_kernel(node, mod)
                return True
            if isinstance(mod, int8_amx.Quantize):
                self._quantize(node, mod.scale, mod.zero_point, mod.channels_last)
                return True
            return False
        if node.op == "call_function" and node.target is int8.quantize_u8:
            self._quantize(node, float(node.args[1]), int(node.args[2]),
                           bool(node.args[3]) if len(node.args) > 3 else False)
            return True
        if node.op == "call_function" and node.target is int8.dequantize_u8:
            tvm = self.tvm
            x = self._value(node.args[0], node, uint8=True)
            if x.dtype != "uint8":
                raise Unsupported(f"'{node.name}' dequantizes a {x.dtype} value")
            scale, zp = tvm.tirx.const(float(node.args[1]), "float32"), tvm.tirx.const(float(node.args[2]), "float32")
            stored = self._stored(x)
            expr = self._simple("dequantize", [(x.expr, stored, "uint8")], lambda a: tvm.te.compute(
                stored, lambda *i: (a[i].astype("float32") - zp) * scale, name="T"), stored, "dequantize uint8", [node])
            self.env[node] = _V(expr, x.shape, x.nhwc)
            return True
        if node.op == "call_function" and node.target in int8.OUT_ARGS:
            raise Unsupported(f"'{node.name}': an int8 layer the generated kernels do not cover (its post-op, groups, "
                              "dilation or a computed weight)")
        return False

    def _quantize(self, node: fx.Node, scale: float, zp: int, channels_last: bool) -> None:
        """:func:`.int8.quantize_u8`'s float32 arithmetic (a division, rounded half to even), as uint8."""
        tvm = self.tvm
        x = self._value(node.args[0], node)
        if channels_last and len(x.shape) == 4:
            x = self._nhwc(x, node)
        sc, z = tvm.tirx.const(float(scale), "float32"), tvm.tirx.const(float(zp), "float32")
        lo, hi = tvm.tirx.const(0.0, "float32"), tvm.tirx.const(255.0, "float32")
        stored = self._stored(x)
        expr = self._simple("quantize", [(x.expr, stored)], lambda a: tvm.te.compute(
            stored, lambda *i: tvm.tirx.max(tvm.tirx.min(tvm.tirx.round(a[i] / sc) + z, hi), lo).astype("uint8"),
            name="T"), stored, "quantize to uint8", [node])
        self.env[node] = _V(expr, x.shape, x.nhwc, "uint8")

    def _int8_kernel(self, node: fx.Node, mod: Any) -> None:
        """An int8 convolution or linear with its fused epilogue (:class:`.int8_amx.Int8Kernel`) as that
        kernel, its buffers the program's compact NHWC tensors, its batch fixed, on every core."""
        import dataclasses

        from . import int8_amx

        x = self._value(node.args[0], node, uint8=True)
        if (x.dtype == "uint8") == mod.float_input:
            raise Unsupported(f"'{node.name}': its int8 kernel takes {'float32' if mod.float_input else 'uint8'}, "
                              f"not {x.dtype}")
        res = self._value(node.args[1], node, uint8=True) if len(node.args) > 1 else None
        out_shape = self._shape(node)
        if mod.conv:
            n, c, h, w = x.shape
            stride, sub = mod.stride, getattr(mod, "subsample", 1)
            if sub > 1 and mod.isa != "vnni":  # AMX computes every grid position: the input subsampled first
                x = self._nhwc(x, node)
                n, c, h, w = n, c, -(-h // sub), -(-w // sub)
                src, stored = self._stored(x), (n, h, w, c)
                sliced = self._simple("subsample", [(x.expr, src, x.dtype)], lambda a: self.tvm.te.compute(
                    stored, lambda i, y, z, j: a[i, y * sub, z * sub, j], name="T"), stored, f"every {sub}th pixel",
                    [node])
                x, sub = _V(sliced, (n, c, h, w), True, x.dtype), 1
            xin = "u8"
            if mod.float_input:
                xin = "f32" if x.nhwc else "f32nchw"  # a float input is read in the layout it has
            elif not x.nhwc:
                x = self._nhwc(x, node)
            base = mod._spec(h, w, xin)
            sp = dataclasses.replace(base, stride=stride * sub)
            rows = None
        else:
            if x.nhwc:
                x = self._logical(x, node)
            rows = math.prod(x.shape[:-1])
            sp = dataclasses.replace(mod._spec(1, rows, "f32" if mod.float_input else "u8"), w=rows)
            n = 1
        _, _, oh, ow = (out_shape if mod.conv else (1, mod.f, 1, rows))
        macs = n * oh * ow * mod.f * mod.c * mod.kh * mod.kw
        sp = dataclasses.replace(sp, n=n, nhwc=True, parallel=macs >= int8_amx.PROGRAM_PARALLEL_MACS,
                                 order=int8_amx.task_order(sp))
        func = int8_amx.prim_func(sp)
        xexpr = x.expr if mod.conv else self._reshape(x.expr, (1, 1, rows, mod.c))
        args = [xexpr, self._const(mod.wt, True), self._const(mod.consts, True)]
        if res is None:
            args.append(self._const(torch.zeros(1)))
        elif mod.conv:
            args.append(self._nhwc(res, node).expr)
        else:
            args.append(self._reshape(self._logical(res, node).expr, (1, 1, rows, mod.f)))
        odt = "uint8" if mod.out_u8 else "float32"
        xlen = int8_amx.scratch_bytes(sp)
        kind = "conv2d" if mod.conv else "linear"
        info = KernelInfo("", f"int8 {kind} {mod.c}->{mod.f} {mod.kh}x{mod.kw} ({sp.isa}, tiles {sp.mb}x{sp.nb}, "
                              f"{sp.order} outer{', parallel' if sp.parallel else ''})", "int8",
                          {"mb": sp.mb, "nb": sp.nb}, nodes=[node.name])
        y = self._call(func, f"int8_{kind}", args, (n, oh, ow, mod.f), info, dtype=odt, scratch=((xlen,), "uint8"))
        if mod.conv:
            self.env[node] = _V(y, out_shape, True, odt)
        else:
            self.env[node] = _V(self._reshape(y, out_shape), out_shape, False, odt)

    # -- the simple ops --------------------------------------------------------------------------------
    def _passthrough(self, op: Op) -> None:
        self.env[op.node] = self._value(op.x, op.node)

    _op_identity = _passthrough
    _op_contiguous = _passthrough

    def _op_dropout(self, op: Op) -> None:
        if op.attrs.get("training") and op.attrs.get("p", 0) != 0:
            raise Unsupported(f"'{op.node.name}': dropout in training mode")
        self._passthrough(op)

    def _op_act(self, op: Op) -> None:
        tvm = self.tvm
        fn = op.attrs.get("fn")
        x = self._value(op.x, op.node)
        zero = tvm.tirx.const(0.0, "float32")
        fused = self._epilogue_act(op, op.x)  # what a kernel's write-back computes, the same expression here
        if fused is not None:
            from .tir_expr import epilogue

            def f(v: Any) -> Any:
                return epilogue(tvm, v, (fused,), None, None)
        elif fn == "hardtanh":
            lo = tvm.tirx.const(float(op.attrs.get("min_val", -1.0)), "float32")
            hi = tvm.tirx.const(float(op.attrs.get("max_val", 1.0)), "float32")

            def f(v: Any) -> Any:
                return tvm.tirx.min(tvm.tirx.max(v, lo), hi)
        elif fn in ("hardswish", "hardsigmoid"):  # x * relu6(x + 3) / 6, relu6(x + 3) / 6, as PyTorch computes them
            three, six = tvm.tirx.const(3.0, "float32"), tvm.tirx.const(6.0, "float32")

            def f(v: Any) -> Any:
                gate = tvm.tirx.min(tvm.tirx.max(v + three, zero), six)
                return v * gate / six if fn == "hardswish" else gate / six
        elif fn == "leaky_relu":
            slope = tvm.tirx.const(float(op.attrs.get("negative_slope", 0.01)), "float32")

            def f(v: Any) -> Any:
                return tvm.tirx.Select(v > zero, v, v * slope)
        else:
            raise Unsupported(f"'{op.node.name}': activation {fn} has no kernel here")
        stored = self._stored(x)
        expr = self._simple(fn, [(x.expr, stored)], lambda a: tvm.te.compute(stored, lambda *i: f(a[i]), name="T"),
                            stored, fn, [op.node])
        self.env[op.node] = _V(expr, x.shape, x.nhwc)

    def _binary(self, op: Op, fn: Any, name: str) -> None:
        tvm = self.tvm
        node = op.node
        args = list(node.args[:2]) if len(node.args) >= 2 else [op.x, op.other]
        if op.attrs.get("alpha", 1) != 1:
            raise Unsupported(f"'{node.name}': {name} with alpha")
        out_shape = self._shape(node)
        vals: list[Any] = []
        for a in args:
            if isinstance(a, (int, float)):
                vals.append(float(a))
            elif isinstance(a, fx.Node) and isinstance(self.env.get(a), int | float) \
                    and not isinstance(self.env.get(a), bool):
                vals.append(float(self.env[a]))
            elif isinstance(a, fx.Node) and isinstance(self.env.get(a), torch.Tensor) and self.env[a].numel() == 1:
                vals.append(float(self.env[a]))
            else:
                vals.append(self._value(a, node))
        tensors = [v for v in vals if isinstance(v, _V)]
        nhwc = len(out_shape) == 4 and any(v.nhwc for v in tensors) and all(
            len(v.shape) == 4 and v.shape == out_shape for v in tensors)
        if not nhwc:
            tensors_fixed = [self._logical(v, node) for v in tensors]
            if any(len(v.shape) > len(out_shape) for v in tensors_fixed):
                raise Unsupported(f"'{node.name}': {name} of these shapes")
        else:
            tensors_fixed = [self._nhwc(v, node) for v in tensors]
        it = iter(tensors_fixed)
        vals = [next(it) if isinstance(v, _V) else v for v in vals]
        stored = (out_shape[0], out_shape[2], out_shape[3], out_shape[1]) if nhwc else out_shape
        inputs = [(v.expr, self._stored(v)) for v in vals if isinstance(v, _V)]

        def compute(*phs: Any) -> Any:
            ph = iter(phs)
            ops = [next(ph) if isinstance(v, _V) else v for v in vals]

            def elem(*i: Any) -> Any:
                got = []
                for o, v in zip(ops, vals, strict=True):
                    if not isinstance(v, _V):
                        got.append(tvm.tirx.const(o, "float32"))
                        continue
                    shp = self._stored(v)
                    idx = i[len(i) - len(shp):]  # right-aligned broadcasting
                    got.append(o[tuple(0 if d == 1 and stored[len(stored) - len(shp) + k] != 1 else ix
                                       for k, (d, ix) in enumerate(zip(shp, idx, strict=True)))])
                return fn(*got)
            return tvm.te.compute(stored, elem, name="T")

        expr = self._simple(name, inputs, compute, stored, name, [node])
        self.env[node] = _V(expr, out_shape, nhwc)

    def _op_add(self, op: Op) -> None:
        self._binary(op, lambda a, b: a + b, "add")

    def _op_sub(self, op: Op) -> None:
        self._binary(op, lambda a, b: a - b, "sub")

    def _op_mul(self, op: Op) -> None:
        self._binary(op, lambda a, b: a * b, "mul")

    def _op_div(self, op: Op) -> None:
        if op.attrs.get("rounding_mode") is not None:
            raise Unsupported(f"'{op.node.name}': division with rounding")
        self._binary(op, lambda a, b: a / b, "div")

    def _op_pad(self, op: Op) -> None:
        """A constant pad: on an NHWC value along H and W (F.pad's last two pairs), else in the model's layout."""
        tvm = self.tvm
        node = op.node
        if op.attrs.get("mode", "constant") != "constant":
            raise Unsupported(f"'{node.name}': {op.attrs.get('mode')} padding")
        pads = [int(p) for p in (op.attrs.get("pad") or ())]
        if len(pads) % 2 or any(p < 0 for p in pads):
            raise Unsupported(f"'{node.name}': padding {pads} (cropping)")
        x = self._value(op.x, node)
        rank = len(x.shape)
        before = [0] * rank
        for i in range(len(pads) // 2):  # last dim first
            before[rank - 1 - i] = pads[2 * i]
        out_shape = self._shape(node)
        value = tvm.tirx.const(float(op.attrs.get("value", 0.0) or 0.0), "float32")
        nhwc = x.nhwc and before[:2] == [0, 0] and out_shape[:2] == x.shape[:2]
        if nhwc:
            before = [0, before[2], before[3], 0]
            stored, src = (out_shape[0], out_shape[2], out_shape[3], out_shape[1]), self._stored(x)
        else:
            x = self._logical(x, node)
            stored, src = out_shape, x.shape

        def compute(a: Any) -> Any:
            def elem(*i: Any) -> Any:
                idx = [i[d] - before[d] for d in range(rank)]
                inside = [cond for d in range(rank) if stored[d] != src[d]
                          for cond in (idx[d] >= 0, idx[d] < src[d])]
                return tvm.tirx.if_then_else(tvm.tirx.all(*inside), a[tuple(idx)], value) if inside else a[tuple(idx)]
            return tvm.te.compute(stored, elem, name="T")
        expr = self._simple("pad", [(x.expr, src)], compute, stored, "pad", [node])
        self.env[node] = _V(expr, out_shape, nhwc)

    def _op_cat(self, op: Op) -> None:
        """Concatenation: along the channels of NHWC values (their last axis), else in the model's layout."""
        tvm = self.tvm
        node = op.node
        parts = [self._value(a, node) for a in (op.x or [])]
        dim = int(op.attrs.get("dim", 0))
        out_shape = self._shape(node)
        if not parts:
            raise Unsupported(f"'{node.name}': an empty concatenation")
        rank = len(out_shape)
        dim = dim % rank
        nhwc = rank == 4 and dim == 1 and any(p.nhwc for p in parts)
        parts = [self._nhwc(p, node) if nhwc else self._logical(p, node) for p in parts]
        axis = 3 if nhwc else dim
        shapes = [self._stored(p) for p in parts]
        stored = (out_shape[0], out_shape[2], out_shape[3], out_shape[1]) if nhwc else out_shape
        offsets = [0]
        for shp in shapes:
            offsets.append(offsets[-1] + shp[axis])

        def compute(*phs: Any) -> Any:
            def elem(*i: Any) -> Any:
                value = None
                for k in reversed(range(len(phs))):
                    idx = tuple(i[d] - offsets[k] if d == axis else i[d] for d in range(rank))
                    value = phs[k][idx] if value is None else tvm.tirx.if_then_else(i[axis] < offsets[k + 1],
                                                                                    phs[k][idx], value)
                return value
            return tvm.te.compute(stored, elem, name="T")
        expr = self._simple("cat", [(p.expr, shp) for p, shp in zip(parts, shapes, strict=True)], compute, stored,
                            "concatenation", [node])
        self.env[node] = _V(expr, out_shape, nhwc)

    def _op_reshape(self, op: Op) -> None:
        """A reshape or flatten: of the value in the model's layout (free where it already is)."""
        out_shape = self._shape(op.node)
        x = self._logical(self._value(op.x, op.node), op.node)
        self.env[op.node] = _V(self._reshape(x.expr, out_shape), out_shape)

    _op_flatten = _op_reshape

    def _op_mean(self, op: Op) -> None:
        node = op.node
        x = self._value(op.x, node)
        dims = op.attrs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if len(x.shape) == 4 and sorted(d % 4 for d in dims) == [2, 3]:
            self._global_average(node, x, bool(op.attrs.get("keepdim", False)))
            return
        tvm, te = self.tvm, self.tvm.te
        x = self._logical(x, node)
        rank = len(x.shape)
        axes = sorted({d % rank for d in dims}) or list(range(rank))
        keep = bool(op.attrs.get("keepdim", False))
        out_shape = self._shape(node)
        inv = tvm.tirx.const(1.0 / math.prod(x.shape[d] for d in axes), "float32")

        def compute(a: Any) -> Any:
            red = {d: te.reduce_axis((0, x.shape[d]), f"r{d}") for d in axes}

            def elem(*i: Any) -> Any:
                it, idx = iter(i), []
                for d in range(rank):
                    if d in red:
                        idx.append(red[d])
                        if keep:
                            next(it)
                    else:
                        idx.append(next(it))
                return te.sum(a[tuple(idx)] * inv, axis=list(red.values()))
            return te.compute(out_shape, elem, name="T")
        self.env[node] = _V(self._simple("mean", [(x.expr, x.shape)], compute, out_shape, f"mean over {axes}", [node],
                                         _schedule_rows), out_shape)

    def _global_average(self, node: fx.Node, x: _V, keepdim: bool) -> None:
        tvm, te = self.tvm, self.tvm.te
        x = self._nhwc(x, node)
        n, c, h, w = x.shape
        scale = 1.0 / (h * w)

        def compute(a: Any) -> Any:
            rh, rw = te.reduce_axis((0, h), "rh"), te.reduce_axis((0, w), "rw")
            return te.compute((n, 1, 1, c), lambda i, _a, _b, j: te.sum(a[i, rh, rw, j] * tvm.tirx.const(scale, "float32"),
                                                                        axis=[rh, rw]), name="T")
        expr = self._simple("mean", [(x.expr, (n, h, w, c))], compute, (n, 1, 1, c), "global average", [node],
                            _schedule_pool)
        v = _V(expr, (n, c, 1, 1), True)
        if keepdim:
            self.env[node] = v
        else:
            self.env[node] = _V(self._reshape(expr, (n, c)), (n, c))

    def _op_pool(self, op: Op) -> None:
        tvm, te = self.tvm, self.tvm.te
        node = op.node
        p = _pool_params(op)
        x = self._value(op.x, node)
        if len(x.shape) != 4:
            raise Unsupported(f"'{node.name}': pooling of a {len(x.shape)}-D tensor")
        if op.attrs["fn"] == "adaptive_avg":
            if p["output_size"] != (1, 1):
                raise Unsupported(f"'{node.name}': adaptive average pooling to {p['output_size']} (only 1x1 here)")
            self._global_average(node, x, True)
            return
        if p["ceil_mode"] or p["divisor_override"] is not None or None in (p["kernel"], p["stride"], p["padding"],
                                                                           p["dilation"]):
            raise Unsupported(f"'{node.name}': pooling with ceil_mode, a divisor override or uneven sizes")
        x = self._nhwc(x, node)
        n, c, h, w = x.shape
        out_shape = self._shape(node)
        oh, ow = out_shape[2:]
        (kh_, kw_), (sh, sw), (ph, pw), (dh, dw) = p["kernel"], p["stride"], p["padding"], p["dilation"]
        is_max = op.attrs["fn"] == "max"

        def compute(a: Any) -> Any:
            rh, rw = te.reduce_axis((0, kh_), "rh"), te.reduce_axis((0, kw_), "rw")

            def at(i: Any, y: Any, z: Any, j: Any) -> Any:
                hh, ww = y * sh - ph + rh * dh, z * sw - pw + rw * dw
                inside = tvm.tirx.all(hh >= 0, hh < h, ww >= 0, ww < w)
                fill = tvm.tirx.min_value("float32") if is_max else tvm.tirx.const(0.0, "float32")
                return tvm.tirx.if_then_else(inside, a[i, hh, ww, j], fill) if (ph or pw) else a[i, hh, ww, j]
            if is_max:
                return te.compute((n, oh, ow, c), lambda i, y, z, j: te.max(at(i, y, z, j), axis=[rh, rw]), name="T")
            if p["count_include_pad"] or not (ph or pw):
                scale = 1.0 / (kh_ * kw_)
                return te.compute((n, oh, ow, c), lambda i, y, z, j: te.sum(
                    at(i, y, z, j) * tvm.tirx.const(scale, "float32"), axis=[rh, rw]), name="T")
            raise Unsupported(f"'{node.name}': average pooling that does not count the padding")
        expr = self._simple("pool", [(x.expr, (n, h, w, c))], compute, (n, oh, ow, c), f"{op.attrs['fn']} pool",
                            [node], _schedule_pool)
        self.env[node] = _V(expr, out_shape, True)

    # -- the ops of a transformer (token rows in the model's layout) -----------------------------------
    def _rows(self, op: Op) -> tuple[_V, tuple[int, ...], int]:
        """``op``'s input in the model's layout, its shape, and ``op``'s axis (``dim``) as a positive index."""
        x = self._logical(self._value(op.x, op.node), op.node)
        dim = op.attrs.get("dim", -1)
        if not isinstance(dim, int):
            raise Unsupported(f"'{op.node.name}': over dims {dim}")
        return x, x.shape, dim % len(x.shape)

    def _op_layer_norm(self, op: Op) -> None:
        """LayerNorm over the last dimension: the mean, then the biased variance about it, as PyTorch."""
        tvm, te = self.tvm, self.tvm.te
        node = op.node
        x = self._logical(self._value(op.x, node), node)
        shape = x.shape
        if list(op.attrs.get("normalized_shape") or []) != [shape[-1]]:
            raise Unsupported(f"'{node.name}': a LayerNorm over {op.attrs.get('normalized_shape')} (the last "
                              "dimension only here)")
        d, eps = shape[-1], float(op.attrs.get("eps", 1e-5))
        w, b = op.const("weight"), op.const("bias")
        inputs = [(x.expr, shape)] + [(self._const(t), (d,)) for t in (w, b) if t is not None]

        def compute(a: Any, *affine: Any) -> Any:
            lead = shape[:-1]
            r1, r2 = te.reduce_axis((0, d), "r1"), te.reduce_axis((0, d), "r2")
            inv = tvm.tirx.const(1.0 / d, "float32")
            mean = te.compute(lead, lambda *i: te.sum(a[(*i, r1)] * inv, axis=r1), name="mean")
            var = te.compute(lead, lambda *i: te.sum((a[(*i, r2)] - mean[i]) * (a[(*i, r2)] - mean[i]) * inv, axis=r2),
                             name="var")
            it = iter(affine)
            wt, bt = (next(it) if w is not None else None), (next(it) if b is not None else None)

            def elem(*i: Any) -> Any:
                y = (a[i] - mean[i[:-1]]) * tvm.tirx.rsqrt(var[i[:-1]] + tvm.tirx.const(eps, "float32"))
                if wt is not None:
                    y = y * wt[i[-1]]
                return y + bt[i[-1]] if bt is not None else y
            return te.compute(shape, elem, name="T")
        expr = self._simple("layer_norm", inputs, compute, shape, "LayerNorm", [node], _schedule_rows)
        self._set(node, _V(expr, shape))

    def _set(self, node: fx.Node, v: _V) -> None:
        """``node``'s value; an op with a tuple output (native_layer_norm's) gives its first item as index 0."""
        got = self.shapes.get(node)
        self.env[node] = (v,) if isinstance(got, tuple | list) else v

    def _op_softmax(self, op: Op) -> None:
        node = op.node
        x, shape, dim = self._rows(op)
        if dim != len(shape) - 1 or op.attrs.get("dtype") not in (None, torch.float32):
            raise Unsupported(f"'{node.name}': a softmax over dim {dim} of {len(shape)} (the last only here)")
        self.env[node] = _V(self._softmax(x.expr, shape, node), shape)

    def _softmax(self, expr: Any, shape: tuple[int, ...], node: fx.Node) -> Any:
        """A softmax over the last dimension: the row's maximum subtracted, as PyTorch."""
        tvm, te = self.tvm, self.tvm.te
        d, lead = shape[-1], shape[:-1]

        def compute(a: Any) -> Any:
            r1, r2 = te.reduce_axis((0, d), "r1"), te.reduce_axis((0, d), "r2")
            top = te.compute(lead, lambda *i: te.max(a[(*i, r1)], axis=r1), name="top")
            e = te.compute(shape, lambda *i: tvm.tirx.exp(a[i] - top[i[:-1]]), name="e")
            total = te.compute(lead, lambda *i: te.sum(e[(*i, r2)], axis=r2), name="total")
            return te.compute(shape, lambda *i: e[i] / total[i[:-1]], name="T")
        return self._simple("softmax", [(expr, shape)], compute, shape, "softmax", [node], _schedule_rows)

    def _op_matmul(self, op: Op) -> None:
        """A product of two values (attention's q·kᵀ and p·v), batched, the batch dims broadcast."""
        node = op.node
        a = self._logical(self._value(op.x, node), node)
        b = self._logical(self._value(op.other, node), node)
        if len(a.shape) < 2 or len(b.shape) < 2:
            raise Unsupported(f"'{node.name}': a matmul with a 1-D operand")
        if b.shape[-2] != a.shape[-1]:
            raise Unsupported(f"'{node.name}': a matmul of shapes {a.shape} and {b.shape}")
        out_shape = self._shape(node)
        expr = self._product("matmul", a, b, out_shape, f"batched matmul {a.shape} x {b.shape}", node)
        self.env[node] = _V(expr, out_shape)

    def _product(self, name: str, a: _V, b: _V, out_shape: tuple[int, ...], what: str, node: fx.Node,
                 b_transposed: bool = False, scale: float | None = None) -> Any:
        """``a · b`` (``b``'s last two dims swapped where ``b_transposed``), each product times ``scale``
        where given, over the last dims, the leading (batch) dims broadcast right-aligned."""
        te = self.tvm.te
        k = a.shape[-1]
        lead = out_shape[:-2]
        sc = None if scale is None else self.tvm.tirx.const(scale, "float32")

        def pick(t_shape: tuple[int, ...], i: tuple) -> tuple:
            bl = t_shape[:-2]
            return tuple(0 if dd == 1 and lead[len(lead) - len(bl) + j] != 1 else i[len(lead) - len(bl) + j]
                         for j, dd in enumerate(bl))

        def compute(x: Any, y: Any) -> Any:
            r = te.reduce_axis((0, k), "r")

            def elem(*i: Any) -> Any:
                yv = y[(*pick(b.shape, i[:-2]), i[-1], r)] if b_transposed else y[(*pick(b.shape, i[:-2]), r, i[-1])]
                v = x[(*pick(a.shape, i[:-2]), i[-2], r)] * yv
                return te.sum(v if sc is None else v * sc, axis=r)
            return te.compute(out_shape, elem, name="T")
        return self._simple(name, [(a.expr, a.shape), (b.expr, b.shape)], compute, out_shape, what, [node],
                            _schedule_rows)

    def _permuted(self, node: fx.Node, x: _V, perm: list[int]) -> None:
        te = self.tvm.te
        out_shape = self._shape(node)
        if sorted(perm) != list(range(len(x.shape))):
            raise Unsupported(f"'{node.name}': a permutation {perm} of a {len(x.shape)}-D value")
        if perm == list(range(len(perm))):
            self.env[node] = x
            return
        inv = [perm.index(d) for d in range(len(perm))]
        expr = self._simple("transpose", [(x.expr, x.shape)], lambda a: te.compute(
            out_shape, lambda *i: a[tuple(i[inv[d]] for d in range(len(perm)))], name="T"), out_shape,
            f"transpose {perm}", [node], _schedule_transpose if len(out_shape) == 4 else None)
        self.env[node] = _V(expr, out_shape)

    def _op_transpose(self, op: Op) -> None:
        x = self._logical(self._value(op.x, op.node), op.node)
        rank = len(x.shape)
        d0, d1 = int(op.attrs.get("dim0", 0)) % rank, int(op.attrs.get("dim1", 1)) % rank
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        self._permuted(op.node, x, perm)

    def _op_permute(self, op: Op) -> None:
        x = self._logical(self._value(op.x, op.node), op.node)
        dims = op.attrs.get("dims")
        if dims and isinstance(dims[0], list | tuple):
            dims = dims[0]
        self._permuted(op.node, x, [int(d) % len(x.shape) for d in (dims or [])])

    def _op_unsqueeze(self, op: Op) -> None:
        self._op_reshape(op)

    _op_squeeze = _op_unsqueeze

    def _op_split(self, op: Op) -> None:
        """A split along one dimension: each part a copy (a fused q/k/v projection's three parts)."""
        te = self.tvm.te
        node = op.node
        x, shape, dim = self._rows(op)
        parts = self.shapes.get(node)
        if not isinstance(parts, tuple | list):
            raise Unsupported(f"'{node.name}': a split without a tuple of parts")
        out, start = [], 0
        for part in parts:
            pshape = tuple(part.shape)

            def compute(a: Any, s0: int = start, ps: tuple = pshape) -> Any:
                return te.compute(ps, lambda *i: a[tuple(i[d] + s0 if d == dim else i[d] for d in range(len(ps)))],
                                  name="T")
            out.append(_V(self._simple("split", [(x.expr, shape)], compute, pshape, f"part of a split along {dim}",
                                       [node]), pshape))
            start += pshape[dim]
        self.env[node] = tuple(out)

    def _op_getitem(self, op: Op) -> None:
        node = op.node
        got = self.env.get(op.x) if isinstance(op.x, fx.Node) else None
        index = op.attrs.get("index", node.args[1] if len(node.args) > 1 else None)
        if not isinstance(got, tuple) or not isinstance(index, int) or not -len(got) <= index < len(got):
            raise Unsupported(f"'{node.name}': indexing of something other than a split's parts (or a "
                              "LayerNorm's output)")
        self.env[node] = got[index]

    def _op_sdpa(self, op: Op) -> None:
        """softmax(q·kᵀ·scale)·v, no mask, no dropout: three kernels (the two products and the softmax)."""
        node = op.node
        a = op.attrs
        if a.get("attn_mask") is not None or float(a.get("dropout_p", 0.0) or 0.0) != 0.0 or a.get("is_causal") \
                or a.get("enable_gqa"):
            raise Unsupported(f"'{node.name}': attention with a mask, dropout, causality or grouped heads")
        q = self._logical(self._value(op.x, node), node)
        k = self._logical(self._value(op.other[0], node), node)
        v = self._logical(self._value(op.other[1], node), node)
        if not (len(q.shape) == len(k.shape) == len(v.shape) >= 3) or q.shape[:-2] != k.shape[:-2] \
                or k.shape[:-2] != v.shape[:-2]:
            raise Unsupported(f"'{node.name}': attention of shapes {q.shape}, {k.shape}, {v.shape}")
        d, t, s_ = q.shape[-1], q.shape[-2], k.shape[-2]
        lead = q.shape[:-2]
        scores = self._product("attn_scores", q, k, (*lead, t, s_), "attention scores q·kᵀ", node, b_transposed=True,
                               scale=float(a.get("scale") or 1.0 / math.sqrt(d)))
        p = _V(self._softmax(scores, (*lead, t, s_), node), (*lead, t, s_))
        out_shape = (*lead, t, v.shape[-1])
        self.env[node] = _V(self._product("attn_values", p, v, out_shape, "attention p·v", node), out_shape)


# -- schedules of the simple kernels ----------------------------------------------------------------------


def _schedule_elementwise(tvm: Any, s: Any, shape: tuple[int, ...]) -> None:
    """One loop over every element: whole vectors innermost, chunks over the cores when it is large."""
    block = s.get_sblock("T")
    loops = s.get_loops(block)
    fused = s.fuse(*loops) if len(loops) > 1 else loops[0]
    numel = math.prod(shape)
    if numel % VECTOR == 0 and numel >= VECTOR:
        fused, lanes = s.split(fused, [None, VECTOR])
        s.vectorize(lanes)
    if numel >= PARALLEL_MIN:
        outer, _ = s.split(fused, [64, None])
        s.parallel(outer)


def _schedule_rows(tvm: Any, s: Any, shape: tuple[int, ...]) -> None:
    """A row-wise kernel (a LayerNorm, a softmax, a batched product): the output's rows (every axis but the
    last) in one loop, each row's statistics computed inside it (a row's values stay in cache), the rows
    over the cores when the output is large."""
    block = s.get_sblock("T")
    loops = s.get_loops(block)
    lead = len(shape) - 1
    if lead < 1:
        return
    row = s.fuse(*loops[:lead]) if lead > 1 else loops[0]
    for name in ("total", "e", "top", "var", "mean"):  # each after its consumers are inside the row loop
        try:
            s.compute_at(s.get_sblock(name), row)
        except Exception:  # noqa: BLE001 - not in this kernel
            continue
    if math.prod(shape) >= PARALLEL_MIN:
        s.parallel(row)


def _schedule_transpose(tvm: Any, s: Any, shape: tuple[int, ...]) -> None:
    """A layout transpose: rows of the output over the cores, the rest in order."""
    block = s.get_sblock("T")
    loops = s.get_loops(block)
    if math.prod(shape) >= PARALLEL_MIN:
        s.parallel(s.fuse(loops[0], loops[1]))


def _schedule_pool(tvm: Any, s: Any, shape: tuple[int, ...]) -> None:
    """A window reduction on NHWC: output rows over the cores, channels in vectors innermost."""
    block = s.get_sblock("T")
    n, y, z, c, rh, rw = s.get_loops(block)
    s.reorder(n, y, z, rh, rw, c)
    rows = s.fuse(n, y)
    # vectorized and parallel before the init is split off: both need the whole reduction block
    if math.prod(shape) >= PARALLEL_MIN // 4:
        s.parallel(rows)
    if shape[-1] % VECTOR == 0:
        co, ci = s.split(c, [None, VECTOR])
        s.reorder(co, rh, rw, ci)
        s.vectorize(ci)
        init = s.decompose_reduction(block, rh)
        s.vectorize(s.get_loops(init)[-1])


# -- building --------------------------------------------------------------------------------------------


def lower(gm: fx.GraphModule, example: tuple, trials: int = 0, db: Any = None, budget_s: float = math.inf,
          progress: Any = None) -> tuple[Any, list[KernelInfo], bool, int]:
    """The Relax module of the flat graph ``gm`` (placeholders in, a tuple of its output leaves out) on
    ``example``, its kernels, whether it returns one tensor (not a tuple), and how many configurations were
    measured: ``trials`` per distinct kernel the database has not settled, until ``budget_s`` seconds have
    passed (the rest take the database's best, else the cost model's choice). Raises :class:`Unsupported`."""
    from optic.autotune import TuningDB

    for a in example:
        if not isinstance(a, torch.Tensor) or a.dtype != torch.float32 or a.device.type != "cpu":
            raise Unsupported("every input must be a float32 CPU tensor")
    gm = _with_int8_kernels(gm)
    database = db if isinstance(db, TuningDB) else TuningDB(db)  # a path or None: opened once, not per kernel
    low = _Lowering(gm, example, trials, database, budget_s, progress)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        mod = low.run(placeholders)
    finally:
        if low.runner is not None:
            low.runner.close()
        if database is not db:
            database.close()
    return mod, low.kernels, low.single, low.measurements


def program_script(program: Any) -> str:
    """The whole program :class:`TVMGraph` would build for ``program`` (on its example, nothing measured:
    the database's or the cost model's configurations), as TVMScript: its Relax function and one line per
    kernel (name, what it computes, template configuration); or why it is not built."""
    import torch.utils._pytree as pytree

    why = check(program.gm)
    if why:
        return f"# not built: {why}\n"
    flat = tuple(pytree.tree_leaves((program.example_args, program.example_kwargs)))
    try:
        mod, kernels, _, _ = lower(program.gm, flat)
    except Unsupported as e:
        return f"# not built: {e}\n"
    lines = [f"# {len(kernels)} kernels, each generated by optic (template configuration, or a simple loop):"]
    for k in kernels:
        cfg = " ".join(f"{n}={v}" for n, v in k.config.items())
        lines.append(f"#   {k.name}: {k.what}" + (f"  [{cfg}]" if cfg else ""))
    return "\n".join(lines) + "\n" + mod["main"].script().strip("\n") + "\n"


def compile_relax(mod: Any) -> Any:
    """The VM executable of a module from :func:`lower`: TVM's CPU pipeline without its fusion (every kernel
    is already whole), with optic's TIR pipeline (dynamic macro tiles)."""
    from optic.tvm_compat import host_target, require_tvm

    from .dynamic_tiles import TIR_PIPELINE, register_pipeline

    tvm = require_tvm()
    register_pipeline(tvm)
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    host = host_target()
    t = tvm.relax.transform
    passes = [t.LegalizeOps(), t.AnnotateTIROpPattern(), *cpu_generic.dataflow_lower_passes(host),
              *cpu_generic.finalize_passes(host)]
    with host:
        return tvm.compile(mod, host, relax_pipeline=tvm.transform.Sequential(passes), tir_pipeline=TIR_PIPELINE)


class TVMGraph(_FrozenGraph):
    """The flat graph (placeholders in, its output leaves as a tuple out) served by one TVM program for the
    example's shapes (see the module docstring). Calls the program does not serve go to Inductor's
    whole-graph program (:class:`.whole.CompiledGraph`, made on the first of them: another batch size is
    then compiled as the Inductor implementation would have been), which itself runs the plain graph where
    nothing compiled may serve (gradients, tracing)."""

    def __init__(self, graph_module: fx.GraphModule, dynamic: bool = False):
        super().__init__(graph_module)
        self.dynamic = dynamic  # the graph serves other sizes (optic.ir.dynamic): Inductor's program for them is dynamic
        self.signature: list[tuple] = []
        self.kernels: list[KernelInfo] = []
        self.library: tuple[str, bytes] | None = None  # (machine fingerprint, the shared library)
        self.single = False
        self.measurements = 0
        self._vm: Any = None
        self._main: Any = None
        self._other: Any = None

    def _others(self, *args: Any) -> Any:
        """A call the TVM program does not serve (see the class docstring)."""
        if self._other is None:
            from .whole import CompiledGraph

            # held outside the module tree: its graph module is this one's (state_dict, copies skip it)
            object.__setattr__(self, "_other", CompiledGraph(self.graph_module, dynamic=getattr(self, "dynamic", False)))
        return self._other(*args)

    def build(self, example: tuple, trials: int = 0, db: Any = None, budget_s: float = math.inf,
              progress: Any = None) -> None:
        """Lower, tune (see :func:`lower`) and compile the program for ``example``'s shapes."""
        from optic.targets.cpu import host_fingerprint

        t0 = time.perf_counter()
        mod, self.kernels, self.single, self.measurements = lower(self.graph_module, tuple(example), trials, db,
                                                                  budget_s, progress)
        ex = compile_relax(mod)
        self.signature = [(tuple(a.shape), a.dtype) for a in example]
        self._load_executable(ex)
        try:
            self.library = (host_fingerprint(), self._export(ex))
        except Exception as e:  # noqa: BLE001 - no C compiler to link it: a pickled copy builds it again on load
            log.info("optic: the TVM program's library is not stored (%s); a copy rebuilds it", error_line(e))
            self.library = None
        self.compile_s = time.perf_counter() - t0
        self._track()

    @staticmethod
    def _export(ex: Any) -> bytes:
        with tempfile.TemporaryDirectory(prefix="optic-tvm-graph-") as tmp:
            path = Path(tmp) / "graph.so"
            # TVM's C++ logs a line per function scope it saves ("Warning: Scope Saving:") on the process's
            # stderr, whatever the caller's logging: nothing a user can act on, so it goes to /dev/null
            # (a failure still raises, with its message)
            saved = os.dup(2)
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, 2)
                ex.export_library(str(path))
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.close(null)
            return path.read_bytes()

    def _load_executable(self, ex: Any) -> None:
        from optic.tvm_compat import require_tvm

        tvm = require_tvm()
        vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
        object.__setattr__(self, "_vm", vm)
        object.__setattr__(self, "_main", vm["main"])

    def _load(self) -> None:
        from optic.targets.cpu import host_fingerprint
        from optic.tvm_compat import require_tvm

        tvm = require_tvm()
        if self.library is not None and self.library[0] == host_fingerprint():
            with tempfile.NamedTemporaryFile(prefix="optic-tvm-graph-", suffix=".so", delete=False) as f:
                f.write(self.library[1])
            try:
                self._load_executable(tvm.runtime.load_module(f.name))
            finally:
                os.unlink(f.name)
        else:  # built on another kind of machine: build again (the tuning database has the configurations)
            log.warning("optic: the TVM program was built on another machine; building it again for this one")
            example = [torch.zeros(s, dtype=d) for s, d in self.signature]
            self.build(example, 0)
        if not self._frozen:
            self._track()

    def profile(self, args: tuple, runs: int = 3) -> list[Any]:
        """Each kernel's time in one call on ``args`` (the example's shapes), as the report's kernel table has
        them (:class:`.profiling.Kernel`), slowest first: every call of the program timed by the VM's
        instrument hook, averaged over ``runs`` calls after one untimed call (the hook's own cost, about a
        microsecond a kernel, is in each figure); empty where the program does not serve ``args``."""
        from optic.tvm_compat import require_tvm

        from .profiling import Kernel

        if not self._servable(tuple(args)):
            return []
        if self._main is None:
            self._load()
        tvm = require_tvm()
        import tvm_ffi

        described = {k.name: k for k in self.kernels}
        totals: dict[str, list[float]] = {}
        started: list[float] = []

        def instrument(func: Any, name: Any, before: bool, ret: Any, *rest: Any) -> int:
            now = time.perf_counter()
            if before:
                started.append(now)
            elif started:
                row = totals.setdefault(str(name), [0.0, 0.0])
                row[0] += now - started.pop()
                row[1] += 1
            return int(tvm.relax.VMInstrumentReturnKind.NO_OP)

        inputs = [tvm_ffi.from_dlpack(aligned(a)) for a in args]
        self._main(*inputs)
        self._vm.set_instrument(tvm_ffi.convert(instrument))
        try:
            for _ in range(runs):
                self._main(*inputs)
        finally:
            self._vm.set_instrument(None)
        rows = []
        for name, (seconds, count) in totals.items():
            k = described.get(name)
            if k is None:
                continue  # the VM's own builtins (allocation, shape checks, views)
            source = "generated (optic, TVM template)" if k.source == "template" else "generated (optic, TVM)"
            rows.append(Kernel(f"{name}: {k.what}", source, count / runs, seconds * 1e3 / runs))
        return sorted(rows, key=lambda r: -r.ms)

    def _servable(self, args: tuple) -> bool:
        if not self.signature or self.failed is not None or len(args) != len(self.signature) or self._tracing():
            return False
        grad = torch.is_grad_enabled()
        for a, (shape, dtype) in zip(args, self.signature, strict=True):
            if not isinstance(a, torch.Tensor) or not self._servable_value(a, grad) or a.dtype != dtype \
                    or tuple(a.shape) != shape:
                return False
        return True

    def forward(self, *args: Any) -> Any:
        if not self._servable(args):
            return self._others(*args)
        try:
            if self._main is None:
                self._load()
            if self._changed():
                self.failed = "a weight changed after the TVM program was built (optimize again to rebuild it)"
                log.warning("optic: %s; Inductor's whole-graph program serves from now on", self.failed)
                return self._others(*args)
            import tvm_ffi

            out = self._main(*[tvm_ffi.from_dlpack(aligned(a)) for a in args])
            if self.single:
                return (torch.from_dlpack(out),)
            return tuple(torch.from_dlpack(o) for o in out)
        except Exception as e:
            if self.failed is None:
                self.failed = error_line(e)
                log.warning("optic: the TVM program failed (%s); Inductor's whole-graph program serves from now on",
                            self.failed)
            return self._others(*args)

    def _apply(self, fn, recurse=True):  # .to(), .half(): the program holds the old weights
        self.failed = self.failed or "the module was moved or cast after the TVM program was built"
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_vm": None, "_main": None, "_other": None}

    def __deepcopy__(self, memo: dict) -> TVMGraph:
        import copy

        new = TVMGraph.__new__(TVMGraph)
        memo[id(self)] = new
        state = {k: (None if k == "_other" else v if k in ("_vm", "_main", "library", "kernels")
                     else copy.deepcopy(v, memo)) for k, v in self.__dict__.items()}
        new.__dict__.update(state)
        new._frozen, new._versions = [], []
        if new._main is not None:
            new._track()
        return new


def profile_program(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any] | None:
    """The kernel table of a program :func:`wrap` made (its :class:`TVMGraph` profiled on what it receives
    from ``gm(*args, **kwargs)``), or None when ``gm`` is not one."""
    inner = getattr(gm, "compiled", None)
    if not isinstance(inner, TVMGraph):
        return None
    seen = inputs_seen(inner, gm, args, kwargs)
    return inner.profile(seen) if seen is not None else []


def wrap(program: Any, trials: int = 0, db: Any = None, budget_s: float = math.inf, progress: Any = None) -> Any:
    """A clone of ``program`` whose graph calls one :class:`TVMGraph`, built now on the example (raises
    :class:`Unsupported` where the graph has an op without a kernel here; ``trials``, ``db``, ``budget_s``:
    see :func:`lower`)."""
    from .whole import wrap as wrap_graph

    made: list[TVMGraph] = []

    def module(gm: fx.GraphModule) -> TVMGraph:
        made.append(TVMGraph(gm, dynamic=bool(program.dims)))
        return made[0]

    out = wrap_graph(program, module=module)
    made[0].build(inputs_seen(made[0], out.gm, program.example_args, program.example_kwargs), trials, db, budget_s,
                  progress)
    return out
