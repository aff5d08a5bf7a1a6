"""whole: the whole optimized graph as one compiled program, one implementation the CPU step times.

Per-layer kernel swaps (:mod:`.vendor`, :mod:`.generated`) leave everything between the GEMMs to
PyTorch's ops, one Python dispatch each. This implementation hands the optimized graph to Inductor
with its weights frozen (``freezing=True``, the configuration PyTorch recommends for CPU inference):
fp32 linears become MKL packed GEMMs and convs oneDNN kernels with prepacked blocked weights and
their binary post-ops (conv + add + relu in one call), and every elementwise, LayerNorm, GELU and
softmax run between them is generated as fused C++ loops. The CPU step (``cpu_tactics``) times it
against PyTorch's ops and the per-layer tactics on the whole model and keeps the fastest.

:class:`CompiledGraph` holds the plain graph (its ``state_dict``, pickles and deep copies are plain)
and compiles it on its first call, and again whenever what was frozen can be stale: a weight edited
in place or loaded (its version changes), the module moved or cast (``.to``, ``.half()``), or an input
of another shape or dtype (Inductor's guards). It runs the plain graph where a compiled program
cannot serve: inputs that need gradients, tracing (``torch.export``, fx, an outer ``torch.compile``),
other devices. A failed compile is never an error: the plain graph runs, and the step that chose it
had measured it working.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import time
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

# Inductor's int8 lowering copies each weight's zero points with torch.tensor(tensor), which warns once per
# compiled int8 layer: noise about PyTorch's own code that a user can do nothing about
warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning,
                        module=r"torch\._inductor\.mkldnn_lowerings")

NAME = "whole graph compiled (Inductor, frozen weights)"
log = logging.getLogger("optic")
INT8_GENERATED = "int8 kernels generated (AMX)"
ENV = "OPTIC_WHOLE_GRAPH"  # "0": the CPU step does not offer the whole-graph implementation
# freezing: weights are constants (folded, prepacked); cpp_wrapper: the kernels are called from
# generated C++, no Python per op (measured 2.09x -> 2.45x over eager on mobilenetv2 at batch 1)
# enable_kernel_profile: each generated kernel is named in a profile (the report's kernel table); when
# nothing profiles, that costs one flag test per kernel
INDUCTOR_CONFIG = {"freezing": True, "cpp_wrapper": True, "cpp.enable_kernel_profile": True}


def unavailable() -> str | None:
    """Why the whole-graph implementation cannot be built here, or None."""
    if not any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "Inductor needs a C++ compiler on the CPU and none was found (install g++)"
    return None


def choice(ctx: Any) -> Any:
    """Which whole-graph implementations the CPU step offers: True (both), "compiled", "packaged" or False,
    from the option ``whole_graph`` (declared by the CPU step), else ``$OPTIC_WHOLE_GRAPH``."""
    from optic.errors import OpticError

    which = ctx.option("whole_graph")
    if which is None:  # unset: the environment decides
        which = os.environ.get(ENV, "1") != "0"
    if which not in (True, False, "compiled", "packaged"):
        raise OpticError(f"option whole_graph={which!r}: expected True (offer both), 'compiled', 'packaged' or False")
    return which


def will_compile(ctx: Any, later: list[Any]) -> bool:
    """Whether the whole graph will be offered compiled after the passes so far: a step that offers it
    (``compiles_whole_graph``) is among ``later`` (the passes still to run), no lossy pass follows that
    step (it would need the graph), it is switched on, and it can be built here."""
    steps = [i for i, p in enumerate(later) if getattr(p, "compiles_whole_graph", False)]
    if not steps or not ctx.measure or getattr(ctx.target, "kind", None) != "cpu" or unavailable() is not None:
        return False
    if any(not getattr(p, "exact", True) for p in later[steps[0] + 1:]):
        return False
    return bool(choice(ctx))


def will_generate(ctx: Any, later: list[Any]) -> bool:
    """Whether the CPU step (``compiles_whole_graph``: it offers the generated int8 kernels too) is among
    ``later``, measures here, and optic's generated int8 kernels run on this CPU."""
    from . import int8_amx

    if not any(getattr(p, "compiles_whole_graph", False) for p in later):
        return False
    return bool(ctx.measure) and getattr(ctx.target, "kind", None) == "cpu" and int8_amx.unavailable() is None


def generated_call(program: Any) -> Any:
    """A zero-argument call of ``program`` on its example with its int8 operators run by optic's generated
    kernels (:func:`.int8_amx.use_kernels`), what the CPU step offers where the whole graph stays open for
    a later pass; the plain graph where none applies."""
    from . import int8, int8_amx

    gm = program.gm
    if int8.rounds(gm):
        generated = program.clone()
        try:
            if int8_amx.use_kernels(generated.gm):
                gm = generated.gm
        except Exception as e:  # noqa: BLE001 - the plain graph is timed
            log.info("generated int8 kernels not built for timing: %s", error_line(e))
    args, kwargs = program.example_args, program.example_kwargs
    return lambda: gm(*args, **kwargs)


def compiled_call(program: Any) -> Any:
    """A zero-argument call of ``program`` on its example, the whole graph compiled (what the allocator
    times actions whose gain shows only there). A graph with int8 operators, where optic's generated AMX
    kernels run (:mod:`.int8_amx`), is also built with them, and the faster of the two is the call (the
    CPU step chooses between them the same way)."""
    from . import int8, int8_amx

    compiled = wrap(program)
    args, kwargs = program.example_args, program.example_kwargs
    calls = {"compiled": lambda: compiled.gm(*args, **kwargs)}
    if int8.rounds(program.gm) and int8_amx.unavailable() is None:
        generated = program.clone()
        try:
            if int8_amx.use_kernels(generated.gm):
                calls[INT8_GENERATED] = lambda: generated.gm(*args, **kwargs)
                with torch.no_grad():
                    calls[INT8_GENERATED]()
        except Exception as e:  # noqa: BLE001 - the compiled graph alone is timed
            log.info("generated int8 kernels not built for timing: %s", error_line(e))
            calls.pop(INT8_GENERATED, None)
    if len(calls) == 1:
        return calls["compiled"]
    from optic.pipeline import timing

    with torch.no_grad():
        t = timing.compare_models(calls, 0.6)
    return calls[min(t, key=lambda k: t[k].median)]


compiled_call.how, compiled_call.short = "with the whole graph compiled", "compiled"
generated_call.how, generated_call.short = "with optic's generated int8 kernels", "generated kernels"


def error_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (what reports and warnings show)."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:limit]}"


class _FrozenGraph(nn.Module):
    """What both whole-graph implementations share: the plain graph they fall back to, which calls a
    built program may serve, and the versions of the tensors it froze (an outside edit makes it stale)."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module
        self.compile_s: float | None = None
        self.failed: str | None = None  # why the built program failed or was turned off (the plain graph runs)
        self._frozen: list[torch.Tensor] = []
        self._versions: list[int] = []

    def _track(self) -> None:
        """Take the frozen tensors' versions as they are now."""
        if not self._frozen:
            self._frozen = _tensors(self.graph_module)
        self._versions = [t._version for t in self._frozen]

    def _changed(self) -> bool:
        """Whether a frozen tensor changed since :meth:`_track` (edited in place, loaded)."""
        return any(t._version != v for t, v in zip(self._frozen, self._versions, strict=True))

    @staticmethod
    def _servable_value(a: Any, grad: bool) -> bool:
        """Whether a built program may take ``a``: not a traced value (fake tensor, proxy), on the CPU, and
        not an input whose gradient is wanted."""
        if isinstance(a, torch.Tensor):
            return type(a) is torch.Tensor and a.device.type == "cpu" and not (grad and a.requires_grad)
        return not isinstance(a, fx.Proxy)

    @staticmethod
    def _tracing() -> bool:
        return torch.compiler.is_compiling() or torch.compiler.is_exporting()

    def _fall_back(self, what: str, e: BaseException, *args: Any) -> Any:
        if self.failed is None:
            self.failed = error_line(e)
            log.warning("optic: the %s failed (%s); running the plain graph", what, self.failed)
        return self.graph_module(*args)

    def __getstate__(self) -> dict:  # built programs are neither copied nor saved; versions are taken again
        state = dict(self.__dict__)
        state.update(_frozen=[], _versions=[])
        return state


class CompiledGraph(_FrozenGraph):
    """An fx graph run as one Inductor-compiled program with frozen weights (see the module doc)."""

    def __init__(self, graph_module: fx.GraphModule, dynamic: bool = False):
        super().__init__(graph_module)
        self.dynamic = dynamic  # the graph serves other sizes (optic.ir.dynamic): compile a dynamic one when they come
        self._reset()

    def _reset(self) -> None:
        self._compiled: Any = None
        self._frozen, self._versions = [], []
        self.compile_s = None
        self.failed = None

    # -- running -------------------------------------------------------------------------------------
    def _servable(self, args: tuple) -> bool:
        grad = torch.is_grad_enabled()
        return not self._tracing() and all(self._servable_value(a, grad) for a in torch.utils._pytree.tree_leaves(args))

    def _stale(self) -> bool:
        """Whether a frozen tensor changed since the compiled program last ran (edited in place, loaded).
        What the graph itself updates (a buffer it writes) changes during a call, and is taken as it is
        after each call, so only changes made from outside count."""
        return self._changed()

    def compile(self) -> None:
        """Set up compilation (Inductor compiles on the next call); later calls reuse it until something it
        froze changes."""
        t0 = time.perf_counter()
        self._frozen = []
        self._track()
        # dynamic=False: Inductor specialises on the shapes it sees and guards them (another batch size
        # compiles again); freezing folds and prepacks the weights, which is why staleness is checked
        # a fresh GraphModule over the same graph and tensors: fresh code, so Dynamo's cache (keyed on the
        # code, guarding shapes but not values) cannot hand back a program with the old frozen weights
        # optic's int8 kernels as Inductor's int8 patterns: a copy, so a fresh module too
        fresh = int8_for_inductor(self.graph_module)
        if fresh is self.graph_module:
            fresh = fx.GraphModule(self.graph_module, self.graph_module.graph)
        # held outside the module tree: not a child module (state_dict, .modules() and copies skip it)
        # a graph with dynamic dimensions: Dynamo's automatic dynamic shapes compile one program for every size
        # once a second size comes (dynamic=None), instead of one program per size up to its cache limit
        dynamic = None if getattr(self, "dynamic", False) else False
        object.__setattr__(self, "_compiled", torch.compile(fresh, dynamic=dynamic))
        self.compile_s = time.perf_counter() - t0

    def forward(self, *args: Any) -> Any:
        if not self._servable(args):
            return self.graph_module(*args)
        if self._compiled is None or self._stale():
            self.compile()
        # Inductor compiles lazily, on this call or on any later one whose guards fail (another shape):
        # freezing must be on whenever it may compile (torch.compile's options= does not reach it), and
        # it applies to inference graphs only (no input needs a gradient here)
        import torch._inductor.config as inductor_config

        try:
            with torch.no_grad(), inductor_config.patch(INDUCTOR_CONFIG):
                out = self._compiled(*args)
            self._track()
            return out
        except Exception as e:  # e.g. another shape that does not compile: the plain graph serves it
            return self._fall_back("compiled graph", e, *args)

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cpu(): what was frozen is another tensor now
        self._reset()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # the compiled program is neither copied nor saved: compiled again
        return {**super().__getstate__(), "_compiled": None}


def int8_for_inductor(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with optic's int8 kernels written in the quantize/dequantize form Inductor fuses back into
    prepacked oneDNN int8 calls with their activations, requantization and residual adds (see
    :func:`optic.backend.int8.as_qdq`); ``gm`` itself when it has none, or when ``OPTIC_INT8_QDQ=0``."""
    from .int8 import as_qdq

    return gm if os.environ.get("OPTIC_INT8_QDQ") == "0" else as_qdq(gm)


def _tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """Every tensor the graph reads from its module (parameters, buffers, plain tensor attributes)."""
    from optic.ir.graph import live_tensors

    return list({id(t): t for t in [*live_tensors(gm).values(), *gm.parameters(), *gm.buffers()]}.values())


def writes_state(program: Any) -> bool:
    """Whether running the graph on its example changes one of its tensors (a buffer it updates)."""
    tensors = _tensors(program.gm)
    before = [t._version for t in tensors]
    with torch.no_grad():
        program.clone().gm(*program.example_args, **program.example_kwargs)
    return any(t._version != v for t, v in zip(tensors, before, strict=True))


def wrap(program: Any, packaged: bool = False) -> Any:
    """A clone of ``program`` whose graph calls one :class:`CompiledGraph` over its own graph (with
    ``packaged``: one :class:`PackagedGraph`, built now on the program's example inputs).

    The compiled graph takes the placeholders flat and returns the output's tensors flat; the outer
    graph keeps the original's placeholders, calling convention (fx's or export's pytree codegen) and
    output structure, so callers see no difference."""
    import copy
    import operator

    from torch.fx.graph import CodeGen

    inner = program.clone()
    out = program.clone()
    old_out = next(n for n in inner.gm.graph.nodes if n.op == "output")
    leaves: list[fx.Node] = []
    fx.map_arg(old_out.args[0], lambda n: leaves.append(n) if n not in leaves else None)

    graph = fx.Graph()
    graph._codegen = copy.deepcopy(inner.gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for node in inner.gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.target, type_expr=node.type,
                                          default_value=node.args[0] if node.args else inspect.Signature.empty)
            env[node].meta = dict(node.meta)
    call = graph.call_module("compiled", tuple(env[n] for n in inner.gm.graph.nodes if n.op == "placeholder"))
    got: dict[fx.Node, fx.Node] = {}
    for i, leaf in enumerate(leaves):
        got[leaf] = graph.call_function(operator.getitem, (call, i))
        got[leaf].meta = {k: v for k, v in leaf.meta.items() if k in ("val", "tensor_meta", "shape", "dtype")}
    graph.output(fx.map_arg(old_out.args[0], lambda n: got[n]))

    old_out.args = (tuple(leaves),)  # the compiled graph: flat in, flat out
    inner.gm.graph._codegen = CodeGen()
    inner.gm.recompile()
    root = nn.Module()
    root.compiled = PackagedGraph(inner.gm) if packaged else CompiledGraph(inner.gm, dynamic=bool(program.dims))
    out.gm = fx.GraphModule(root, graph)
    if packaged:  # the flat inputs the inner graph sees on the example: what the package is built for
        seen: list[tuple] = []
        hook = root.compiled.register_forward_pre_hook(lambda _m, a: seen.append(a))
        with torch.no_grad():
            out.gm(*program.example_args, **program.example_kwargs)
        hook.remove()
        out.gm.compiled.build(seen[0], program.dims)
    return out


PACKAGED = "whole graph packaged (AOTInductor, frozen weights)"


class PackagedGraph(_FrozenGraph):
    """An fx graph compiled ahead of time into one AOTInductor package: the whole model is one call into
    generated C++ (no Dynamo guards, no Python wrapper), with the weights frozen into the package.

    The package serves calls with the shapes and dtypes it was built for, while no frozen tensor has
    changed; any other call runs the plain graph (other shapes, gradients, tracing), and a weight edited
    after the build turns the package off for good, with a warning (optimize again to rebuild it). The
    package's bytes pickle and deep-copy with the module; the plain graph is its state."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__(graph_module)
        self.signature: list[Any] = []
        self.dims: Any = None  # optic.ir.dynamic.Dims the package serves at any size (None: the example's shapes)
        self.package: bytes | None = None
        self.machine: str | None = None  # optic.targets.cpu.host_fingerprint() of the machine that built it
        self._runner: Any = None

    def build(self, example: tuple, dims: Any = None) -> None:
        """Export the graph and compile the package (tens of seconds for a real-size model). ``dims``
        (optic.ir.dynamic.Dims of the flat inputs): the dimensions the package serves at any size in their
        ranges; the others are the example's."""
        import io

        import torch._inductor
        import torch._inductor.config as inductor_config

        t0 = time.perf_counter()
        self.dims = dims if dims else None
        self.signature = [(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in example]
        args, spec = tuple(example), None
        if self.dims:
            from optic.ir.dynamic import doubled

            made: dict[str, Any] = {}

            def dim(name: str, lo: int, hi: int | None) -> Any:
                if name not in made:
                    made[name] = torch.export.Dim(name, min=max(lo, 1), **({} if hi is None else {"max": hi}))
                return made[name]

            spec = tuple({d: dim(*self.dims.per_input[i][d]) for d in self.dims.per_input[i]}
                         if i in self.dims.per_input and isinstance(a, torch.Tensor) else None
                         for i, a in enumerate(example))
            # export specializes sizes 0/1 whatever it is told: trace on the example doubled along them
            args = tuple(doubled(a, [d for d in s_ if a.shape[d] < 2]) if isinstance(s_, dict) else a
                         for a, s_ in zip(example, spec, strict=True))
        graph_module = int8_for_inductor(self.graph_module)
        with torch.no_grad():
            try:
                ep = torch.export.export(graph_module, args, dynamic_shapes=spec, strict=False)
            except Exception as e:  # a pass made a dimension static: the package serves the example's shapes
                if spec is None:
                    raise
                log.info("optic: the package keeps the example's shapes (%s)", error_line(e))
                self.dims = None
                ep = torch.export.export(graph_module, tuple(example), strict=False)
            buf = io.BytesIO()
            with inductor_config.patch(freezing=True):
                torch._inductor.aoti_compile_and_package(ep, package_path=buf)
        self.package = buf.getvalue()
        from optic.targets.cpu import host_fingerprint

        self.machine = host_fingerprint()  # what the package's code was compiled for
        self.compile_s = time.perf_counter() - t0
        self._track()

    def _load(self) -> Any:
        import io

        import torch._inductor

        from optic.targets.cpu import host_fingerprint

        if self._runner is None and getattr(self, "machine", None) not in (None, host_fingerprint()):
            # built on another CPU or torch: its code may not run here (other vector extensions)
            log.warning("optic: the whole-graph package was built on another machine (%s); building it again "
                        "for this one", self.machine)
            example = [torch.zeros(s[0], dtype=s[1]) if isinstance(s, tuple) else s for s in self.signature]
            self.build(example, self.dims)
        if self._runner is None:
            self._runner = torch._inductor.aoti_load_package(io.BytesIO(self.package))
            if not self._frozen:  # loaded from a pickle: the tensors as they came are what was frozen
                self._track()
        return self._runner

    def _servable(self, args: tuple) -> bool:
        if self.package is None or self.failed is not None or len(args) != len(self.signature) or self._tracing():
            return False
        grad = torch.is_grad_enabled()
        dims = getattr(self, "dims", None)
        for i, (a, sig) in enumerate(zip(args, self.signature, strict=True)):
            if not self._servable_value(a, grad):
                return False
            if not isinstance(a, torch.Tensor):
                if a != sig:
                    return False
            elif not isinstance(sig, tuple) or a.dtype != sig[1] or a.dim() != len(sig[0]) or not all(
                    g == w or (dims is not None and dims.allows(i, d, g))
                    for d, (g, w) in enumerate(zip(a.shape, sig[0], strict=True))):
                return False
        return True

    def forward(self, *args: Any) -> Any:
        if not self._servable(args):
            return self.graph_module(*args)
        try:
            runner = self._load()
            if self._changed():
                self.failed = "a weight changed after the package was built (optimize again to rebuild it)"
                log.warning("optic: %s; running the plain graph", self.failed)
                return self.graph_module(*args)
            with torch.no_grad():
                out = runner(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
            return tuple(out)
        except Exception as e:
            return self._fall_back("packaged graph", e, *args)

    def _apply(self, fn, recurse=True):  # .to(), .half(): the package holds the old tensors
        self.failed = self.failed or "the module was moved or cast after the package was built"
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # the package's bytes travel; the loaded runner is loaded again
        return {**super().__getstate__(), "_runner": None}
