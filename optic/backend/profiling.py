"""Which kernels a model really runs, where their code comes from, and their time: PyTorch's profiler
over a few calls of the implementation the backend kept.

Every kernel is attributed to a source: code generated for this model (Inductor's C++ kernels, optic's
TVM kernels), a vendor library (oneDNN with prepacked weights, MKL's packed GEMM), or PyTorch's own
op (ATen); the compiled program's own bookkeeping (guards, wrapper) is one row, "runtime".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

_RUNTIME = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "Pregraph bytecode", "AOTDispatcher",
            "## Call CompiledFxGraph", "## Call", "CompiledFunction")
_NOT_KERNELS = ("aten::empty", "aten::resize_", "aten::as_strided", "aten::view", "aten::reshape",
                "aten::_unsafe_view", "aten::expand", "aten::t", "aten::transpose", "aten::permute",
                "aten::detach", "aten::lift_fresh", "aten::alias", "aten::slice", "aten::select",
                "aten::unsqueeze", "aten::squeeze", "aten::contiguous", "aten::empty_strided",
                "aten::set_", "aten::clone")


@dataclass
class Kernel:
    name: str
    source: str
    calls: float  # per model call
    ms: float  # self time per model call
    shapes: str = ""  # the input shapes it was called with (one row per kernel and shapes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_of(name: str) -> str | None:
    """Where the code of the kernel called ``name`` comes from; None for what is no kernel (a view)."""
    low = name.lower()
    if name.startswith(_RUNTIME):
        return "runtime"
    if "cpp_fused" in low or "triton" in low:
        return "generated (Inductor C++)"
    if "tvm" in low or "optic_kernel" in low:
        return "generated (optic, TVM)"
    if "mkldnn" in low or "onednn" in low:
        return "oneDNN"
    if "mkl" in low:
        return "MKL"
    if name.startswith(_NOT_KERNELS):
        return None
    if name.startswith(("aten::", "aoti_torch_cpu_")):
        return "ATen"
    return None


def profile(fn: Callable[[], Any], runs: int = 3) -> list[Kernel]:
    """Kernels of one call of ``fn`` (self time averaged over ``runs`` calls after one unprofiled call),
    slowest first; an empty list when the profiler is unavailable."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        fn()
        try:
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(runs):
                    fn()
        except Exception:  # a profiler that cannot start here: the report simply has no kernel table
            return []
    rows: dict[tuple, Kernel] = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        src = source_of(ev.key)
        if src is None:
            continue
        runtime = src == "runtime"
        name = "compiled program's runtime (guards, wrapper)" if runtime else ev.key.removeprefix("aoti_torch_cpu_")
        shapes = "" if runtime else ", ".join(str(list(s)) for s in (ev.input_shapes or []) if s)
        k = rows.setdefault((name, shapes), Kernel(name, src, 0.0, 0.0, shapes))
        k.calls += ev.count / runs
        k.ms += ev.self_cpu_time_total / 1e3 / runs
    return sorted(rows.values(), key=lambda k: -k.ms)


def summary(kernels: list[Kernel], top: int = 5) -> str:
    """One line: time per source, then the slowest kernels."""
    by: dict[str, list[Kernel]] = {}
    for k in kernels:
        by.setdefault(k.source, []).append(k)
    parts = [f"{src} {sum(k.ms for k in ks):.2f} ms in {sum(k.calls for k in ks):.0f} call(s)"
             for src, ks in sorted(by.items(), key=lambda kv: -sum(k.ms for k in kv[1]))]
    slow = [f"{k.name}{f' {k.shapes}' if k.shapes else ''} ({k.source}) {k.ms:.2f} ms" for k in kernels
            if k.source != "runtime"][:top]
    return (f"{len(kernels)} kernels, per call (profiled): " + "; ".join(parts)
            + ("; slowest: " + ", ".join(slow) if slow else "") + " (all: report.passes[...].measured['kernels'])")
