"""gpu_tactics: the fastest way to run the whole model on this GPU with PyTorch's own kernels, measured.

The vendor path first: every generated kernel must beat what these give. Whole-model variants, each
checked on the inputs the pass is checked on and timed against the others on the device (CUDA events,
:mod:`optic.pipeline.timing`); the fastest is kept:

- **channels-last** for conv models (cuDNN's NHWC kernels use the tensor cores without transposes);
- **cuDNN benchmark mode** (cuDNN times its algorithms per shape on first use);
- **the SDPA backend** where the graph has ``scaled_dot_product_attention``: flash, memory-efficient,
  cuDNN or math, each forced for the model's calls (PyTorch's own choice is the baseline);
- **TF32** for fp32 GEMMs and convs, only with the user's consent (option ``allow_tf32``): it changes
  numerics (10-bit mantissa products), so it is never tried silently, and it must still pass the check;
- **a CUDA graph** of the whole graph (static shapes: one graph per input shape, captured on first use,
  at most :data:`CUDA_GRAPH_SHAPES`; other calls run the graph as it is): at small batch the launch of
  each kernel from Python is most of the time;
- **the whole graph compiled** by Inductor (``torch.compile``'s kernels as one candidate).

Backend flags (TF32, cuDNN benchmark, SDPA backend) are set for the duration of each call of the
returned module and restored after it (:class:`DeviceSettings`), never left set for the process.
Runs only when the model's examples are on a CUDA device and the target is that GPU (measurement on
the device); for a GPU that is not here it declines, and the artifact path plans instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .. import device
from ..ir import opview
from ..ir.program import Program
from ..pipeline.registry import Option, register
from . import whole
from .vendor import MODEL, TACTICS_CONFIRM_S, _check_variant, fastest, to_channels_last

CUDA_GRAPH_SHAPES = 8  # distinct input shapes that get a CUDA graph each; more calls of other shapes run eagerly
_WARMUP_CALLS = 3  # calls on a side stream before a capture (cuDNN and cuBLAS pick and allocate their workspaces)

# SDPA backends by the name PyTorch's ``torch.nn.attention.SDPBackend`` gives them.
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
HALF_AND_FULL = frozenset({torch.float32, torch.float16, torch.bfloat16})


@contextlib.contextmanager
def backend_flags(tf32: bool | None = None, cudnn_benchmark: bool | None = None,
                  sdpa: str | None = None) -> Iterator[None]:
    """PyTorch's backend flags set for the ``with`` block and restored after it (None: left as they are)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        if cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
        with contextlib.ExitStack() as stack:
            if sdpa is not None:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel([getattr(SDPBackend, sdpa)]))
            yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


class DeviceSettings(nn.Module):
    """The flat graph run under backend flags set for each call only (:func:`backend_flags`)."""

    def __init__(self, graph_module: fx.GraphModule, **flags: Any):
        super().__init__()
        self.graph = graph_module
        self.flags = {k: v for k, v in flags.items() if v is not None}

    def forward(self, *args: Any) -> Any:
        with backend_flags(**self.flags):
            return self.graph(*args)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.flags.items())


class CudaGraphed(nn.Module):
    """The flat graph replayed from a CUDA graph captured per input shape (see the module docstring).

    A replay reads its inputs from the buffers it was captured with: each call copies its inputs there,
    replays, and returns copies of the outputs (a caller may keep them across calls). Calls the graph
    cannot serve run the graph as it is: CPU tensors, gradients, tracing, non-tensor arguments other than
    the captured ones, or more shapes than :data:`CUDA_GRAPH_SHAPES`."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph = graph_module
        self._captured: dict[tuple, tuple[Any, list[torch.Tensor], Any]] = {}
        self.failed: str | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_captured"] = {}  # CUDA graphs neither pickle nor copy: captured again on use
        return state

    def __deepcopy__(self, memo: dict) -> CudaGraphed:
        import copy

        clone = CudaGraphed(copy.deepcopy(self.graph, memo))
        clone.failed = self.failed
        return clone

    @staticmethod
    def _key(args: tuple) -> tuple | None:
        key = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if not a.is_cuda:
                    return None
                key.append((tuple(a.shape), a.dtype, a.stride(), a.device))
            elif isinstance(a, int | float | bool | str | type(None)):
                key.append(a)
            else:
                return None
        return tuple(key)

    def forward(self, *args: Any) -> Any:
        key = None if (self.failed or not device.cuda_in_use() or torch.is_grad_enabled()
                       or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()) else self._key(args)
        if key is None:
            return self.graph(*args)
        entry = self._captured.get(key)
        if entry is None:
            if len(self._captured) >= CUDA_GRAPH_SHAPES:
                return self.graph(*args)
            try:
                entry = self._capture(args)
            except Exception as e:  # noqa: BLE001 - a graph that cannot be captured runs as it is, for good
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return self.graph(*args)
            self._captured[key] = entry
        graph, inputs, outputs = entry
        for buf, a in zip(inputs, args, strict=True):
            if isinstance(buf, torch.Tensor):
                buf.copy_(a)
        graph.replay()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, outputs)

    def _capture(self, args: tuple) -> tuple[Any, list[Any], Any]:
        inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(_WARMUP_CALLS):
                self.graph(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            outputs = self.graph(*inputs)
        return graph, inputs, outputs


class InductorGraph(nn.Module):
    """The flat graph compiled by Inductor for the GPU (``torch.compile``, compiled on the first CUDA call).

    Weights are read as they are at each call (not frozen), so editing them stays right. Calls on other
    devices, needing gradients, or while tracing run the graph as it is."""

    def __init__(self, graph_module: fx.GraphModule, mode: str | None = None):
        super().__init__()
        self.graph, self.mode = graph_module, mode
        self._compiled: Any = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_compiled"] = None  # compiled again on use
        return state

    def forward(self, *args: Any) -> Any:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if (torch.compiler.is_compiling() or not tensors or not all(t.is_cuda for t in tensors)
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
            return self.graph(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.graph, mode=self.mode)
        return self._compiled(*args)


def has_sdpa(gm: fx.GraphModule) -> bool:
    """Whether the graph calls ``scaled_dot_product_attention`` (then its backend is worth choosing)."""
    return any(getattr(opview.view(n, gm), "kind", None) == "sdpa" for n in gm.graph.nodes)


def on_cuda(program: Program) -> bool:
    """Whether the program's example inputs are on a CUDA device."""
    return device.of((program.example_args, program.example_kwargs)).type == "cuda"


@register
class GpuTactics:
    name = "gpu_tactics"
    exact = True
    compiles_whole_graph = True  # run again after a lossy pass that must see the graph (early exit) changed nothing
    description = ("the fastest way to run the whole model on this GPU with PyTorch's kernels, measured: channels-last, "
                   "cuDNN benchmark, the SDPA backend, TF32 (with consent), a CUDA graph, Inductor")
    options = (
        Option("allow_tf32", bool, False, "let fp32 GEMMs and convs use TF32 tensor cores (changes numerics: "
               "10-bit mantissa products; the result must still pass the check)"),
        Option("cuda_graphs", bool, True, "offer the whole graph replayed from CUDA graphs (static shapes)"),
        Option("gpu_compile", bool, True, "offer the whole graph compiled by Inductor"),
        TACTICS_CONFIRM_S,
    )

    def run(self, program: Program, ctx: Any) -> bool:
        why = self._why_not(program, ctx)
        if why:
            ctx.stats.decline("gpu_tactics", MODEL, why)
            return False
        variants, rules = self._variants(program, ctx)
        if len(variants) == 1:
            return False
        best = fastest(variants, program, ctx)
        if best == "torch ops":
            return False
        program.gm = variants[best].gm
        ctx.stats.match(rules[best])
        return True

    @staticmethod
    def _why_not(program: Program, ctx: Any) -> str | None:
        if ctx.target.kind != "gpu":
            return f"target '{ctx.target.name}' is not a GPU"
        if not on_cuda(program):
            return ("the model's examples are not on a CUDA device: nothing can be measured on the GPU here "
                    "(move the model and inputs to cuda, or read the plan in the report)")
        if not ctx.measure:
            return "tactics are chosen by measurement: measuring is off (measure=False)"
        return None

    def _variants(self, program: Program, ctx: Any) -> tuple[dict[str, Program], dict[str, str]]:
        variants: dict[str, Program] = {"torch ops": program.clone()}
        rules: dict[str, str] = {}
        base = program
        cl = program.clone()
        if to_channels_last(cl.gm, HALF_AND_FULL):  # cuDNN's NHWC kernels take fp32, fp16 and bf16 alike
            cl.annotate_shapes()
            self._offer(variants, rules, "channels-last", "channels_last", program, lambda: cl, ctx)
            base = cl
        if ctx.lossy_after:  # the variants below wrap the graph, which a lossy pass after this one must see
            ctx.stats.decline("device_settings", MODEL, "a lossy pass follows and needs to see the graph")
            return variants, rules
        flags: dict[str, Any] = {"cudnn_benchmark": True}
        if bool(ctx.option("allow_tf32")):
            flags["tf32"] = True
        for sdpa in (SDPA_BACKENDS if has_sdpa(program.gm) else (None,)):
            name = "cuDNN benchmark" + (" + TF32" if "tf32" in flags else "") + (f" + SDPA {sdpa}" if sdpa else "")
            self._offer(variants, rules, name, "device_settings", program,
                        lambda s=sdpa: whole.wrap(base, module=lambda g, s=s: DeviceSettings(g, **flags, sdpa=s)), ctx)
        if bool(ctx.option("cuda_graphs")):
            self._offer(variants, rules, "CUDA graph", "cuda_graph", program,
                        lambda: whole.wrap(base, module=lambda g: DeviceSettings(CudaGraphed(g), **flags)), ctx)
        if bool(ctx.option("gpu_compile")):
            self._offer(variants, rules, "whole graph compiled (Inductor)", "whole_graph_compiled", program,
                        lambda: whole.wrap(base, module=lambda g: DeviceSettings(InductorGraph(g), **flags)), ctx)
        return variants, rules

    @staticmethod
    def _offer(variants: dict, rules: dict, name: str, rule: str, program: Program, build: Any, ctx: Any) -> None:
        """Build one variant and check it; a variant that fails either is declined with the reason."""
        t0 = time.perf_counter()
        try:
            candidate = build()
            _check_variant(program, candidate, ctx)
        except Exception as e:  # noqa: BLE001 - the other variants remain
            ctx.stats.decline(rule, MODEL, f"{name}: {whole.error_line(e, 160)}")
            return
        ctx.record.measured[f"{rule}_build_s"] = round(time.perf_counter() - t0, 2)
        variants[name], rules[name] = candidate, rule
