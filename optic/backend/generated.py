"""tvm_kernels: generated (TVM, LLVM) kernels where they beat PyTorch's own, per kernel, by measurement.

The pass behind ``optic.optimize(..., backend="tvm", tune=...)`` on this machine's CPU. Exact.

1. Kernels. Every float32 linear and 2-D convolution (dense, not grouped or transposed, one
   stride/padding/dilation for both dims) with constant weights becomes one kernel together with
   what follows it and can run in its write-back: the bias, an activation the code generator has
   (relu, gelu, silu, tanh, sigmoid), a residual add (``relu(conv(x) + b + skip)`` is one kernel).
   Each is an :class:`optic.autotune.Operator` (matmul ``MxNxK`` with B as ``nn.Linear``'s weight,
   conv2d NCHW), whatever its spelling in the graph.
2. Tuning (``tune``, the effort level, option ``tune``): each distinct operator is tuned with
   :func:`optic.autotune.tune` against the tuning database (option ``tuning_db``: a path or a
   ``TuningDB``; default the user's cache): ``"none"`` measures no candidate (the database's best,
   else the cost model's first choice), ``"fast"`` measures the cost model's 4 best and stops tuning
   new operators after ``tune_budget_s`` (60 s; the rest get the cost model's choice), ``"full"``
   32, an integer that many. Each operator is then marked settled at that level in the database
   (also one the budget left to the cost model): a second ``optimize`` of the same model at the same
   level measures nothing. A higher level, or ``optic tune MODEL --trials N``, tunes further.
3. Tactics, not faith. The chosen kernel is built here (LLVM) and checked on the values the layer
   really sees (recorded on the example inputs), then timed in this process, alternated in blocks,
   against what PyTorch would run for the same ops: the ATen ops as they are and, where it exists,
   oneDNN's fused kernel with prepacked weights (what ``cpu_tactics`` would choose). The generated
   kernel replaces the ops only when it is at least 3 % faster than the fastest of them; the verdict
   is kept in the database beside the tuning records, so it too is measured once.
4. The whole model. Where the CPU step (``cpu_tactics``) follows, it decides: it times its variants of
   the model with the generated kernels and without them (``PassContext.without_generated``), each as
   PyTorch's ops and compiled whole by Inductor, and keeps the fastest, so the TVM backend ends no
   slower than the torch backend would on the same model. Inside a compiled whole graph each kernel is
   one opaque operator, ``torch.ops.optic.generated_kernel`` (no graph break: Inductor compiles
   everything around it into one program). Without that step, the pass times the model before and
   after itself, alternated, and keeps its kernels only when the model is faster. (Option
   ``tvm_keep="all"`` keeps every generated kernel untimed: for testing the rewrite, never for speed.)

Data crosses by DLPack, without copies. A kernel pickles as its compiled library and the machine it was
built for; loaded on another machine (or where the library does not load) it is compiled again from its
tuning records (``TVMKernel.__getstate__``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from optic import ir
from optic.errors import OpticError
from optic.ir import rewrite
from optic.ir.opview import Op, view
from optic.pipeline import timing
from optic.pipeline.cost import kernel_flops
from optic.pipeline.registry import Option, register
from optic.pipeline.verify import compare
from optic.tvm_compat import aligned

from . import whole
from .vendor import ONEDNN_ATTRS, TACTICS_CONFIRM_S, DenseSite, recorded_inputs
from .vendor import Candidate as OneDNNCandidate
from .vendor import fast_call as onednn_call

EFFORT = {"none": 0, "fast": 4, "full": 32}
log = logging.getLogger("optic.backend.generated")
FAST_BUDGET_S = 60.0
_ACTS = frozenset({"relu", "silu", "tanh", "sigmoid", "gelu"})  # the activations the code generator fuses
_KEEP_MARGIN = 0.97  # the generated kernel must be at least 3 % faster than PyTorch's fastest


def trials_for(tune: Any) -> int:
    """Measurements per operator for an effort level (``"none"``, ``"fast"``, ``"full"``) or a count."""
    if isinstance(tune, bool):
        raise OpticError(f"tune takes 'none', 'fast', 'full' or a number of measurements per kernel, not {tune!r}")
    if isinstance(tune, int):
        if tune < 0:
            raise OpticError(f"tune must be 0 or more measurements per kernel, not {tune}")
        return tune
    if isinstance(tune, str) and tune.isdigit():
        return int(tune)
    if tune not in EFFORT:
        raise OpticError(f"tune takes 'none', 'fast', 'full' or a number of measurements per kernel, not {tune!r}")
    return EFFORT[tune]


def tuning_budget_s(ctx: Any, tune_level: Any) -> float:
    """Seconds of tuning per model: the option ``tune_budget_s``, else ``FAST_BUDGET_S`` at ``"fast"``, else no
    limit (the per-layer kernels and the whole-graph TVM program spend it alike)."""
    budget_s = ctx.option("tune_budget_s")
    if budget_s is None:  # unset: the effort level decides
        return FAST_BUDGET_S if tune_level == "fast" else math.inf
    return float(budget_s)


def describe_effort(tune: Any) -> str:
    n = trials_for(tune)
    if n == 0:
        return "tune='none': no candidate measured; each kernel takes the database's best, else the cost model's first choice"
    if tune == "fast":
        return (f"tune='fast': the cost model's {n} best candidates measured per kernel, new kernels tuned for "
                f"at most {FAST_BUDGET_S:.0f} s (the rest take the cost model's choice)")
    return f"tune={tune!r}: up to {n} candidates measured per kernel"


# -- finding kernels ----------------------------------------------------------------------------------
@dataclass
class KernelSite:
    """One kernel in the graph: the main op, what fuses after it, and its operator."""

    op: Op
    nodes: list[fx.Node]  # in graph order; the last one's value is the kernel's output
    epilogue: tuple[str, ...]
    residual: fx.Node | None
    operator: Any = None  # optic.autotune.Operator (set by the guard that accepts the site)
    onednn_act: Op | None = None  # the activation oneDNN would fuse (no residual)
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    @property
    def last(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def inputs(self) -> list[fx.Node]:
        return [self.op.x] + ([self.residual] if self.residual is not None else [])


def _single_user(node: fx.Node, gm: fx.GraphModule) -> Op | None:
    users = ir.value_users(node)
    if len(users) != 1 or ir.is_inplace(users[0]):
        return None
    return view(users[0], gm)


def _activation(op: Op | None, x: fx.Node) -> str | None:
    if op is None or op.kind != "act" or op.x is not x:
        return None
    fn = op.attrs.get("fn")
    if fn == "gelu" and op.attrs.get("approximate", "none") != "none":
        return None
    return fn if fn in _ACTS else None


def _residual(op: Op | None, x: fx.Node) -> fx.Node | None:
    if op is None or op.kind != "add" or op.attrs.get("alpha", 1) != 1:
        return None
    a, b = op.node.args[:2] if len(op.node.args) >= 2 else (op.x, op.other)
    other = b if a is x else a if b is x else None
    if not isinstance(other, fx.Node) or other is x:
        return None
    if ir.shape(other) != ir.shape(x) or ir.dtype(other) != torch.float32:
        return None
    return other


def _uniform(value: Any) -> int | None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or any(not isinstance(v, int) or v != values[0] for v in values):
        return None
    return int(values[0])


def _operator(op: Op, epilogue: tuple[str, ...], b_layout: str = "nk") -> tuple[Any, tuple, tuple, str | None]:
    """``(operator, kernel input shape, kernel output shape, None)`` or ``(None, (), (), why not)``.

    ``b_layout``: the layout a linear's weight is handed to the kernel in: ``"nk"`` as ``nn.Linear`` holds
    it, or ``"kn"``, transposed once when the kernel is made (the CPU template's fast layout)."""
    from optic.autotune import Operator, SpaceError

    w = op.const("weight")
    xs = ir.shape(op.x)
    if xs is None:
        return None, (), (), "input shape unknown"
    try:
        if op.kind == "linear":
            n, k = w.shape
            m = math.prod(xs[:-1])
            return (Operator("matmul", (m, n, k), b_layout=b_layout, epilogue=epilogue), (m, k), (m, n), None)
        a = op.attrs
        if a.get("nd") != 2 or a.get("transposed") or a.get("groups", 1) != 1 or len(xs) != 4 \
                or a.get("padding_mode", "zeros") != "zeros":
            return None, (), (), "only dense, non-transposed, zero-padded 2-D convolutions have a template"
        stride, padding, dilation = (_uniform(a.get(k)) for k in ("stride", "padding", "dilation"))
        if None in (stride, padding, dilation):
            return None, (), (), "stride, padding or dilation differ between the dims"
        f, c, r, s = w.shape
        # computed directly on channel blocks (weights packed once, the NCHW input read in place or, where
        # the conv pads, copied into padded blocks): the im2col GEMM on the model's NCHW measured 2-6x
        # oneDNN's time on ResNet-50's layers
        operator = Operator("conv2d", (xs[0], c, xs[2], xs[3], f, r, s), stride=stride, padding=padding,
                            dilation=dilation, epilogue=epilogue, layout="NCHWc")
        return operator, tuple(xs), operator.out_shape, None
    except SpaceError as e:
        return None, (), (), str(e)


@dataclass
class FusedKernel(DenseSite):
    """A dense conv/linear (``kinds``) and what can run in its write-back: the bias, one activation the
    code generator has, a residual add (in any order the graph has them). The guard accepts it when a
    template covers the result, and then completes the site with its operator; ``b_layout``: see
    :func:`_operator`."""

    b_layout: str = "nk"

    def match(self, op: Op, ctx: Any) -> KernelSite | None:
        if super().match(op, ctx) is None:
            return None
        gm = op.node.graph.owning_module
        nodes, epilogue, residual = [op.node], [], None
        if op.const("bias") is not None:
            epilogue.append("bias")
        while True:
            nxt = _single_user(nodes[-1], gm)
            act = _activation(nxt, nodes[-1])
            if act and not any(e in _ACTS for e in epilogue):
                epilogue.append(act)
                nodes.append(nxt.node)
                continue
            res = _residual(nxt, nodes[-1]) if residual is None else None
            if res is not None and res not in nodes and not _reaches(res, nodes):
                residual = res
                epilogue.append("residual")
                nodes.append(nxt.node)
                continue
            break
        return KernelSite(op, nodes, tuple(epilogue), residual, onednn_act=_onednn_act(nodes, residual, gm))

    def guard(self, site: KernelSite, ctx: Any) -> str | None:
        why = super().guard(site.op, ctx)
        if why:
            return why
        site.operator, site.in_shape, site.out_shape, why = _operator(site.op, site.epilogue, self.b_layout)
        return why


def kernel_sites(gm: fx.GraphModule, stats: Any, b_layout: str = "nk") -> list[KernelSite]:
    """Every dense conv/linear with its epilogue (bias, activation, residual add) that a template covers,
    in graph order; the others are declined in ``stats`` (rules ``tvm_conv``, ``tvm_linear``).
    ``b_layout``: see :func:`_operator`."""
    rules = [FusedKernel("tvm_conv", kinds=frozenset({"conv"}), b_layout=b_layout),
             FusedKernel("tvm_linear", kinds=frozenset({"linear"}), b_layout=b_layout)]
    return _one_kernel_per_node(rewrite.find_sites(gm, rules, None, stats), stats, b_layout)


def _one_kernel_per_node(sites: list[KernelSite], stats: Any, b_layout: str = "nk") -> list[KernelSite]:
    """``sites`` where no two share a node. Both convs of a ResNet block end in its add: the later one keeps
    what comes before the shared node (the downsample conv: the layer and its bias), the add staying in the
    earlier one's kernel; one that no template covers then is declined, naming the kernel that has it."""
    owner: dict[fx.Node, fx.Node] = {}
    kept = []
    for site in sites:
        taken = [n for n in site.nodes if n in owner]
        if taken:
            cut = _cut_before(site, site.nodes.index(taken[0]), b_layout)
            if cut is None:
                stats.decline(f"tvm_{site.op.kind}", site.op.node.name,
                              f"its epilogue ({', '.join(n.name for n in taken)}) is already in "
                              f"{owner[taken[0]].name}'s kernel, and the layer alone has no template")
                continue
            site = cut
        owner.update({n: site.op.node for n in site.nodes})
        kept.append(site)
    return kept


def _onednn_act(nodes: list[fx.Node], residual: fx.Node | None, gm: fx.GraphModule) -> Op | None:
    """The activation oneDNN's pointwise kernel would fuse: the one node after the layer, without a residual."""
    return view(nodes[1], gm) if residual is None and len(nodes) == 2 else None


def _cut_before(site: KernelSite, index: int, b_layout: str) -> KernelSite | None:
    """``site`` with its nodes from ``index`` on left out (they belong to another kernel): the layer and the
    epilogue steps before them, or None when no template covers what is left."""
    nodes = site.nodes[:index]
    # the epilogue is the bias (no node of its own), then one step per node after the layer's
    steps = site.epilogue[:int(site.epilogue[:1] == ("bias",)) + len(nodes) - 1]
    residual = site.residual if "residual" in steps else None
    cut = KernelSite(site.op, nodes, steps, residual,
                     onednn_act=_onednn_act(nodes, residual, site.op.node.graph.owning_module))
    cut.operator, cut.in_shape, cut.out_shape, why = _operator(site.op, cut.epilogue, b_layout)
    return None if why else cut




def _reaches(value: fx.Node, kernel_nodes: list[fx.Node]) -> bool:
    """Whether ``value`` depends on one of the kernel's nodes (then it cannot be an input of the kernel)."""
    inside = set(kernel_nodes)
    stack, seen = [value], set()
    while stack:
        n = stack.pop()
        if n in inside:
            return True
        if n in seen or n.op in ("placeholder", "get_attr"):
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return False


# -- the runtime module -----------------------------------------------------------------------------
class TVMKernel(nn.Module):
    """One compiled kernel: takes the layer's input (and the residual), returns its output. DLPack in and
    out; the weights are buffers (they appear in ``state_dict``). Float32 on this CPU, no gradients."""

    fixed_kernel = True  # the optimized module refuses dtype/device conversions and input gradients
    process_local = True  # called by a per-process key from compiled code: no AOTInductor package holds it

    def __init__(self, fn: Any, lib: Any, weight: torch.Tensor, bias: torch.Tensor | None, in_shape: tuple,
                 out_shape: tuple, result_shape: tuple, description: str, source: tuple | None = None,
                 epilogue: tuple[str, ...] = ()):
        super().__init__()
        self._fn, self._lib = fn, lib  # keep the library loaded as long as the function lives
        self.source = source  # (operator, config): what rebuilds the kernel after unpickling
        self.epilogue = tuple(epilogue)  # bias/activation/residual: what optic.pipeline.cost counts besides the layer
        self.register_buffer("weight", aligned(weight))
        self.register_buffer("bias", None if bias is None else aligned(bias))
        self.in_shape, self.out_shape, self.result_shape = tuple(in_shape), tuple(out_shape), tuple(result_shape)
        self.description = description
        self._register()

    def _register(self) -> None:
        """Name this kernel for :func:`generated_kernel` (what a compiled whole graph calls), for as long
        as it lives."""
        self.key = f"k{next(_KEYS)}"
        _LIVE[self.key] = self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._register()  # a key is per process: an unpickled kernel takes a new one

    def __deepcopy__(self, memo: dict) -> TVMKernel:  # the compiled function is immutable: share it
        w = self.weight.clone()
        b = None if self.bias is None else self.bias.clone()
        return TVMKernel(self._fn, self._lib, w, b, self.in_shape, self.out_shape, self.result_shape,
                         self.description, self.source, self.epilogue)

    def flops(self, out_shape: tuple) -> Any:
        """FLOPs per call, as optic.pipeline.cost counts the layer and epilogue this kernel replaced."""
        w = tuple(self.weight.shape)
        if self.source is not None and self.source[0].direct:  # packed: the layer's [F, C, R, S]
            w = (self.source[0].args[4], self.source[0].args[1], *self.source[0].args[5:7])
        transposed = self.source is not None and self.source[0].opts.get("b_layout") == "kn"
        return kernel_flops(out_shape, w[::-1] if transposed else w, self.epilogue)

    def __getstate__(self) -> dict:
        """The kernel's state with its compiled library as bytes (a shared object) and the machine it was
        built for; a library that cannot be written (no C compiler here) leaves the tuning records
        (``source``) to rebuild it."""
        if self.source is None:
            raise TypeError(f"a generated kernel ({self.description}) without its source cannot be pickled")
        state = dict(self.__dict__)
        state["_fn"] = state["_lib"] = None
        state["stored_library"] = self._library_bytes()
        return state

    def _library_bytes(self) -> tuple[str, bytes] | None:
        """(machine fingerprint, the shared library's bytes) of the loaded kernel, or what was loaded from
        a file when the kernel has not run since."""
        if self._lib is None:
            return getattr(self, "stored_library", None)
        from optic.targets.cpu import host_fingerprint

        with tempfile.TemporaryDirectory(prefix="optic-kernel-") as tmp:
            path = Path(tmp) / "kernel.so"
            try:
                self._lib.export_library(str(path))
            except Exception as e:  # noqa: BLE001 - no compiler, or a library TVM cannot write: rebuild on load
                log.info("generated kernel %s: library not stored (%s); it is rebuilt on load", self.description, e)
                return None
            return host_fingerprint(), path.read_bytes()

    def _load(self) -> tuple[Any, Any]:
        """(function, library): the stored library when it was built on a machine like this one, else the
        kernel compiled again from its tuning records."""
        from optic.targets.cpu import host_fingerprint

        stored = getattr(self, "stored_library", None)
        if stored is not None and stored[0] == host_fingerprint():
            try:
                from optic.tvm_compat import require_tvm

                tvm = require_tvm()
                with tempfile.NamedTemporaryFile(prefix="optic-kernel-", suffix=".so", delete=False) as f:
                    f.write(stored[1])
                try:
                    lib = tvm.runtime.load_module(f.name)
                finally:
                    os.unlink(f.name)  # the loaded library stays mapped
                return lib["main"], lib
            except Exception as e:  # noqa: BLE001 - a library that does not load here is rebuilt
                log.info("generated kernel %s: stored library did not load (%s); compiling it", self.description, e)
        return compile_kernel(*self.source)

    def _x_shape(self) -> tuple:
        """The input shape the kernel was generated for (a linear's rows flattened into ``in_shape``)."""
        if self.source is not None and self.source[0].op == "matmul":
            return self.result_shape[:-1] + (self.in_shape[-1],)
        return self.in_shape

    def reference(self, x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        """What the kernel computes, with PyTorch's ops, for any input size: the layer, then its epilogue in
        order. Serves the inputs of other sizes than the kernel's (a dynamic batch)."""
        import torch.nn.functional as F

        op = self.source[0]
        w = self.weight.t() if op.op == "matmul" and op.opts.get("b_layout") == "kn" else self.weight
        if op.direct:
            from optic.backend.codegen_cpu import unpack_direct_weight

            w = unpack_direct_weight(w, op)
        if op.op == "matmul":
            y = F.linear(x, w, self.bias)
        else:
            y = F.conv2d(x, w, self.bias, op.opts.get("stride", 1), op.opts.get("padding", 0),
                         op.opts.get("dilation", 1))
        for e in self.epilogue:
            if e == "residual":
                y = y + residual[0]
            elif e != "bias":
                y = {"relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}[e](y)
        return y

    def forward(self, x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self._x_shape() and self.source is not None:  # another size: PyTorch's ops
            return self.reference(x, *residual)
        if torch.compiler.is_compiling():  # inside a compiled whole graph: one opaque call, no graph break
            return torch.ops.optic.generated_kernel(self.key, x, residual[0] if residual else None)
        return self.run(x, *residual)

    def run(self, x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        """The compiled kernel on ``x`` (of the kernel's size) and the residual."""
        if self._fn is None:
            self._fn, self._lib = self._load()
        # TVM's FFI takes torch tensors as DLPack views: no copy, no conversion per call
        out = torch.empty(self.out_shape, dtype=torch.float32, device=x.device)
        args = [aligned(x.reshape(self.in_shape)), self.weight]
        args += [] if self.bias is None else [self.bias]
        args += [aligned(r.reshape(self.out_shape)) for r in residual]
        if torch.autograd._profiler_enabled():  # the report's kernel table names it (backend.profiling)
            with torch.profiler.record_function(f"optic_kernel {self.description}"):
                self._fn(*args, out)
        else:
            self._fn(*args, out)
        return out.view(self.result_shape)

    def extra_repr(self) -> str:
        return self.description


_KEYS = itertools.count()
_LIVE: weakref.WeakValueDictionary[str, TVMKernel] = weakref.WeakValueDictionary()


@torch.library.custom_op("optic::generated_kernel", mutates_args=())
def generated_kernel(key: str, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The generated kernel ``key`` (a live :class:`TVMKernel`) on ``x`` and the residual: how a whole graph
    compiled by Inductor calls it, as one opaque operator (its weights stay the kernel's own buffers)."""
    kernel = _LIVE.get(key)
    if kernel is None:
        raise RuntimeError(f"optic generated kernel {key} no longer exists in this process: compile the graph again")
    return kernel.run(x, *(() if residual is None else (residual,)))


@generated_kernel.register_fake
def _(key, x, residual):
    return x.new_empty(_LIVE[key].result_shape)


def compile_kernel(operator: Any, config: dict[str, int]) -> tuple[Any, Any]:
    """``(function, library)`` of ``operator`` with ``config``, built for this CPU (LLVM)."""
    from optic.backend import codegen_cpu
    from optic.tvm_compat import host_target

    lib = codegen_cpu.compile_module(codegen_cpu.build(operator, config), host_target()).jit()
    return lib["main"], lib


def make_module(site: KernelSite, fn: Any, lib: Any, config: dict[str, int]) -> TVMKernel:
    cfg = " ".join(f"{k}={v}" for k, v in config.items())
    weight = site.op.const("weight")
    if site.operator.op == "matmul" and site.operator.opts.get("b_layout") == "kn":
        weight = weight.t()  # prepacked once: the kernel reads B[K,N]
    elif site.operator.direct:
        from optic.backend.codegen_cpu import pack_direct_weight

        weight = pack_direct_weight(weight, site.operator, config)  # packed once in the kernel's blocks
    return TVMKernel(fn, lib, weight, site.op.const("bias"), site.in_shape, site.out_shape,
                     ir.shape(site.last), f"{site.operator}{' + ' + '+'.join(site.epilogue) if site.epilogue else ''}; {cfg}",
                     (site.operator, dict(config)), epilogue=site.epilogue)


def replace_sites(gm: fx.GraphModule, items: list[tuple[KernelSite, nn.Module, str]], pass_name: str) -> None:
    """Replace each site's nodes with a call of its module (added under a free name near ``name``)."""
    renamed: dict[fx.Node, fx.Node] = {}  # a kernel's output replaces the node an earlier site ended with
    for site, module, name in items:
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(site.last):
            new = gm.graph.call_module(name, tuple(renamed.get(n, n) for n in site.inputs))
        ir.replace(site.last, new, pass_name, site.nodes)
        ir.erase_replaced(site.nodes)
        renamed[site.last] = new
    ir.eliminate_dead_code(gm)
    ir.drop_unused_constants(gm)
    gm.recompile()


# -- the pass ----------------------------------------------------------------------------------------
@dataclass
class KernelChoice:
    """What the pass decided for one operator (the report's per-kernel lines)."""

    operator: str
    layers: list[str]
    config: dict[str, int] | None
    tuned: str  # "database", "measured N", "cost model"
    times_ms: dict[str, float] = field(default_factory=dict)
    chosen: str = "torch"
    why: str = ""
    cached: bool = False
    rank_correlation: float | None = None  # the cost model against this workload's measurements (Spearman)
    spec: dict | None = None  # the operator (Operator.as_dict), to tune or sample it again

    def line(self) -> str:
        times = ", ".join(f"{k} {v:.4f} ms" for k, v in self.times_ms.items())
        cache = " (verdict from the database)" if self.cached else ""
        return (f"{self.operator} ×{len(self.layers)} [{self.tuned}]: {times or 'not timed'} → {self.chosen}"
                f"{cache}{'; ' + self.why if self.why else ''}")


@register
class TVMKernels:
    name = "tvm_kernels"
    exact = True
    description = "generated TVM kernels (tuned tile sizes, fused epilogue) where measured faster than PyTorch's, per kernel"
    options = (
        Option("tune", (str, int), "fast", "tuning effort: 'none', 'fast', 'full' or a number of measurements "
               "per kernel"),
        Option("tvm_keep", str, "faster", "keep generated kernels only where measured faster, or all of them "
               "(testing the rewrite itself)", choices=("faster", "all")),
        Option("tune_budget_s", float, None, f"seconds of tuning per model (unset: {FAST_BUDGET_S:.0f} s with "
               "tune='fast', no limit otherwise)"),
        Option("tuning_db", (str, object), None, "the tuning database: a path or a TuningDB (unset: the default "
               "one under ~/.cache/optic)"),
        Option("tactic_rounds", int, 5, "timing rounds per kernel, generated against PyTorch's"),
        TACTICS_CONFIRM_S,
    )

    def run(self, program: Any, ctx: Any) -> bool:
        if ctx.target.kind != "cpu" or not ctx.measure:
            ctx.stats.decline("tvm_kernels", rewrite.MODEL, "generated kernels replace PyTorch's only where both are measured: "
                              "the target must be this machine's CPU with measuring on")
            return False
        from optic.tvm_compat import tvm_available

        if not tvm_available():
            ctx.stats.decline("tvm_kernels", rewrite.MODEL, "TVM is not installed (pip install 'optic[tvm]')")
            return False
        gm = program.gm
        # B[K,N]: the CPU template runs a linear about 2x faster with its weight transposed (once, here)
        # than in nn.Linear's B[N,K] (matmul 128x3072x768 + bias+gelu: 0.49x PyTorch in B[N,K], 1.02x in B[K,N])
        sites = kernel_sites(gm, ctx.stats, b_layout="kn")
        if not sites:
            return False
        tune_level = ctx.option("tune")
        ctx.note(describe_effort(tune_level))
        from optic.threads import SPIN_HINT, openmp_spin_limited

        if not openmp_spin_limited():
            ctx.note("PyTorch's OpenMP threads spin for milliseconds after each op here (libgomp's default), so "
                     "a generated kernel that follows one shares the cores with them and measures slower (2-3x "
                     f"on ResNet-50's layers); to let generated kernels compete, {SPIN_HINT}")
        groups: dict[str, list[KernelSite]] = {}
        for s in sites:
            groups.setdefault(s.operator.key, []).append(s)
        values = recorded_inputs(program, {n for s in sites for n in (*s.inputs, s.last)})
        choices = self._choose(list(groups.values()), gm, values, ctx, tune_level)
        chosen = [(s, c) for group, c in zip(groups.values(), choices, strict=True) if c[0] is not None for s in group]
        if not chosen:
            return False
        before = program.clone()
        replace_sites(gm, [(site, make_module(site, fn, lib, config), f"tvm_kernel_{i}")
                           for i, (site, (fn, lib, config)) in enumerate(chosen)], "tvm_kernels")
        program.annotate_shapes()
        if ctx.option("tvm_keep") == "all":
            return True
        if whole.cpu_step_follows(ctx, ctx.passes_after):
            # the CPU step follows: it times the whole model with these kernels and without them (each way
            # also compiled as one program, where the kernels are opaque calls), and keeps the fastest
            ctx.without_generated = before
            ctx.note(f"{len(chosen)} generated kernel(s) in the graph; the CPU step (cpu_tactics) times the whole "
                     "model with them and without them, plain and compiled, and keeps the fastest")
            return True
        return self._confirm(before, program, ctx, len(chosen))

    def _choose(self, groups: list[list[KernelSite]], gm: fx.GraphModule, values: dict, ctx: Any, tune_level: Any) -> list:
        from optic.autotune import Runner, TuningDB, tune
        from optic.autotune.tune import workload_key

        trials = trials_for(tune_level)
        budget_s = tuning_budget_s(ctx, tune_level)
        db_opt = ctx.option("tuning_db")
        db = db_opt if isinstance(db_opt, TuningDB) else TuningDB(db_opt)
        runner = Runner() if trials else None
        if runner is not None:
            runner.spawn()  # its imports overlap with what follows
        start = time.perf_counter()
        out, report, measurements = [], [], 0
        try:
            for i, group in enumerate(groups):
                site = group[0]
                level = trials if time.perf_counter() - start < budget_s else 0

                def progress(done: int, total: int, best: float, last: Any, op=site.operator, i=i) -> None:
                    if ctx.progress is not None:  # the bar counts kernels; the text says the measurements
                        ctx.progress(f"tuning {op}: {done}/{total} measured, best {best * 1e3:.4f} ms; kernels",
                                     i, len(groups))

                try:
                    # tuning, unless this kernel is settled at this level (tuned before, or left to the cost
                    # model when a time budget ran out); else what the database holds, measuring nothing
                    settle = bool(trials) and not db.settled(workload_key(site.operator, ctx.target), str(tune_level))
                    result = tune(site.operator, ctx.target, level if settle else 0, db=db, runner=runner,
                                  progress=progress)
                    if settle:
                        db.settle(result.key, str(tune_level))
                except Exception as e:  # a template that cannot cover the sizes: PyTorch keeps the layer
                    choice = KernelChoice(str(site.operator), [s.op.node.name for s in group], None, "no template",
                                          why=str(e).splitlines()[0][:160])
                    report.append(choice)
                    out.append((None, None, None))
                    continue
                measurements += result.measurements
                tuned = (f"measured {result.measurements}" if result.measurements else
                         f"database ({result.records} records)" if result.measured else "cost model")
                choice = KernelChoice(str(site.operator), [s.op.node.name for s in group], result.config, tuned,
                                      rank_correlation=result.rank_correlation, spec=site.operator.as_dict())
                out.append(self._tactic(group, gm, values, ctx, result, db, choice))
                report.append(choice)
                if ctx.progress is not None:
                    ctx.progress(f"{site.operator}: {choice.chosen}; kernels", i + 1, len(groups))
        finally:
            if runner is not None:
                runner.close()
            if not isinstance(db_opt, TuningDB):
                db.close()
        ctx.record.measured["tuning_measurements"] = measurements
        ctx.record.measured["tuning_s"] = round(time.perf_counter() - start, 2)
        ctx.record.measured["kernels"] = [c.__dict__ for c in report]
        n_tvm = sum(c.chosen == "tvm" for c in report)
        ctx.note(f"{len(report)} distinct kernel(s), {sum(len(c.layers) for c in report)} layer(s): "
                 f"{n_tvm} run generated code, {len(report) - n_tvm} stay with PyTorch; {measurements} tuning "
                 f"measurement(s) in {time.perf_counter() - start:.1f} s")
        for c in report:
            ctx.note("  " + c.line())
        return out

    def _tactic(self, group: list[KernelSite], gm: fx.GraphModule, values: dict, ctx: Any, result: Any, db: Any,
                choice: KernelChoice) -> tuple:
        site = group[0]
        none = (None, None, None)
        try:
            fn, lib = compile_kernel(site.operator, result.config)
        except Exception as e:
            choice.why = f"build failed: {str(e).splitlines()[0][:160]}"
            return none
        ins = [values.get(n) for n in site.inputs]
        expected = values.get(site.last)
        if not all(isinstance(t, torch.Tensor) for t in (*ins, expected)):
            choice.why = "inputs not recorded"
            return none
        mod = make_module(site, fn, lib, result.config)
        with torch.no_grad():
            try:
                got = mod(*ins)
            except Exception as e:
                choice.why = f"run failed: {str(e).splitlines()[0][:160]}"
                return none
        check = compare(expected, got, ctx.tolerance)
        if not check.ok:
            choice.why = f"generated kernel's result differs ({check})"
            return none
        if ctx.option("tvm_keep") == "all":  # testing the rewrite itself: no timing, keep every kernel
            choice.chosen, choice.why = "tvm", "kept without timing (option tvm_keep='all')"
            return fn, lib, result.config
        region = ir.subgraph_callable(gm, site.nodes, site.inputs)
        fns = {"torch": lambda: region(*ins)}
        act = site.onednn_act
        if site.residual is None and (act is None or act.attrs.get("fn") in ONEDNN_ATTRS) \
                and not (site.op.kind == "conv" and site.op.attrs.get("padding") is None):
            name, scalars, algo = ONEDNN_ATTRS[act.attrs["fn"]](act.attrs) if act else ("none", [], "")
            cand = OneDNNCandidate(site.op, act, (), attr=(name, scalars or [None], algo))
            try:
                fast = onednn_call(cand, gm)
                if compare(expected, fast(ins[0]), ctx.tolerance).ok:
                    fns["oneDNN"] = lambda: fast(ins[0])
            except RuntimeError:
                pass
        fns["tvm"] = lambda: mod(*ins)
        context = json.dumps({"config": result.config, "candidates": sorted(fns), "key": result.key}, sort_keys=True)
        cached = db.tactic(context)
        if cached is None:
            with torch.no_grad():
                n = timing.calls_per_block(fns["torch"], target_s=0.005)
                t = timing.compare(fns, rounds=int(ctx.option("tactic_rounds")), block=n, warmup=1)
            times = {k: v.median for k, v in t.items()}
            db.add_tactic(context, times)
        else:
            times, choice.cached = cached, True
        choice.times_ms = {k: v * 1e3 for k, v in times.items()}
        vendor = min(v for k, v in times.items() if k != "tvm")
        if times["tvm"] < _KEEP_MARGIN * vendor:
            choice.chosen = "tvm"
            return fn, lib, result.config
        best = min((k for k in times if k != "tvm"), key=times.__getitem__)
        choice.chosen = best
        choice.why = f"generated kernel {times['tvm'] / vendor:.2f}× the time of PyTorch's {best}"
        return none

    @staticmethod
    def _confirm(before: Any, after: Any, ctx: Any, kernels: int) -> bool:
        args, kwargs = after.example_args, after.example_kwargs
        fns = {"torch": (lambda g=before.gm: g(*args, **kwargs)), "tvm": (lambda g=after.gm: g(*args, **kwargs))}
        with torch.no_grad():
            t = timing.compare_models(fns, float(ctx.option("tactics_confirm_s")))
        ctx.record.measured["latency_s"] = (t["torch"].median, t["tvm"].median)
        ctx.note(f"whole model, measured here: PyTorch kernels {t['torch']}, with {kernels} generated kernel(s) "
                 f"{t['tvm']}")
        if t["tvm"].median < t["torch"].median:
            ctx.without_generated = before  # cpu_tactics times this one too (never slower than PyTorch's)
            return True
        after.gm = before.gm
        ctx.note("the model is not faster with the generated kernels: kept PyTorch's")
        return False
