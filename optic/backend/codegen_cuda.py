"""CUDA code generation: a GPU template configuration becomes a scheduled TIR module, CUDA source, a cubin.

``build(operator, config)`` returns a ``tvm.IRModule`` with one PrimFunc, ``main`` (parameters: the
operator's inputs in ``Operator.input_shapes()`` order, then the output), scheduled with exactly the
template's variables (``autotune.templates``: ``matmul_gpu``, ``matmul_tensorcore_gpu`` for a matmul
with ``cores="tensor"``, ``elementwise_gpu``, ``reduction_gpu``).
``compile_cuda(operator, config, target)`` turns it into CUDA source for the target's ``sm_XX``,
compiles that with ``nvcc -cubin -Xptxas -v`` and reads back what ptxas allocated per kernel
(registers, spills, static shared memory) plus the dynamic shared memory TVM declared, next to the
limits the template's constraints were stated against: the verdict ``within_limits`` is the check
that a configuration the solver called valid really fits the hardware.

This module is the road and the verdict; the parts along it live by concern:

- :mod:`.cuda_config`: the template's space for an operator on a GPU, and the cost model's choice in it;
- :mod:`.cuda_schedules`: the TIR schedules (what each template's variables mean in the kernel), and
  :mod:`.cuda_tensorcore` the tensor-core GEMM's (ldmatrix, mma.sync, cp.async);
- :mod:`.cuda_toolchain`: nvcc and ptxas (compiling a source, reading what ptxas allocated).

Their public names are importable from here too.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optic import targets
from optic.autotune.operator import Operator
from optic.autotune.space import SpaceError
from optic.errors import OpticError
from optic.targets import Target
from optic.tvm_compat import require_tvm

from .cuda_config import element_type, gpu_space, gpu_target, model_config
from .cuda_schedules import BUILDERS, default_schedule, notes, schedule_injective
from .cuda_tensorcore import LOWER_ASYNC_COPY, LOWER_EXPLICIT_UNROLL
from .cuda_toolchain import NVCC_TIMEOUT_S, PtxasKernel, compile_cubin, nvcc_version, parse_ptxas

__all__ = ["BUILDERS", "CODEGEN_VERSION", "NVCC_TIMEOUT_S", "CompiledKernel", "PtxasKernel", "build", "compile_cuda",
           "compile_module", "default_schedule", "gpu_space", "model_config", "notes", "nvcc_version",
           "parse_ptxas", "ptx", "schedule_injective", "target_limits"]

CODEGEN_VERSION = 1


def build(operator: Operator, config: Mapping[str, int], dtype: str | None = None) -> Any:
    """The scheduled TIR module (``main``) of ``operator`` with the GPU template ``config``.

    ``dtype``: the element type (float32 or float16; a tensor-core matmul's float16 or int8), by
    default the operator's. The configuration must name every variable of the template's space (a
    missing one raises ``SpaceError``); whether it satisfies the constraints with a given GPU's limits
    is :func:`compile_cuda`'s check, since the schedule itself reads only the variables and one
    configuration may fit one GPU and not another."""
    if operator.op not in BUILDERS:
        raise SpaceError(f"no CUDA code generator for {operator.op}; known: {sorted(BUILDERS)}")
    cfg = dict(config)
    d = element_type(operator, dtype)
    space = gpu_space(operator, targets.get("a100"), d)  # the shapes' constraints; limits are checked per target
    missing = sorted(set(space.names) - set(cfg))
    if missing:
        raise SpaceError(f"configuration for {space.name} lacks {', '.join(missing)}")
    return BUILDERS[operator.op](operator, cfg, d)


@dataclass
class CompiledKernel:
    """A configuration compiled for a GPU, what ptxas allocated, and whether that fits the limits.

    ``compiled`` is False when nvcc is absent or refused the arch (``reason`` says which); then the
    ptxas figures are empty and ``within_limits`` is None. ``limits`` are the target's figures the
    template's constraints were stated with (``regs_per_thread``, ``regs_per_sm``, ``smem_per_block``,
    ``threads_per_block``); ``expected`` what the template's derived quantities say for this
    configuration (its register estimate, shared-memory bytes, threads)."""

    name: str
    target: str
    arch: str
    config: dict[str, int]
    source: str
    compiled: bool
    reason: str = ""
    kernels: list[PtxasKernel] = field(default_factory=list)
    threads: int = 0  # threads per block of the (largest) kernel, from the launch TVM generated
    dynamic_smem: int = 0  # bytes of dynamic shared memory TVM declared (the largest kernel's)
    limits: dict[str, int] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    codegen_seconds: float = 0.0
    nvcc_seconds: float = 0.0
    cu_path: str | None = None
    module: Any = field(default=None, repr=False, compare=False)  # the scheduled TIR module the source came from

    @property
    def registers(self) -> int:
        return max((k.registers for k in self.kernels), default=0)

    @property
    def smem(self) -> int:
        """Shared memory per block: ptxas's static bytes plus TVM's dynamic bytes (largest kernel)."""
        return max((k.static_smem for k in self.kernels), default=0) + self.dynamic_smem

    @property
    def spills(self) -> int:
        return max((k.spill_stores + k.spill_loads for k in self.kernels), default=0)

    @property
    def within_limits(self) -> bool | None:
        return None if not self.compiled else not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "arch": self.arch, "config": self.config,
                "compiled": self.compiled, "reason": self.reason, "registers": self.registers,
                "smem": self.smem, "dynamic_smem": self.dynamic_smem, "threads": self.threads,
                "spills": self.spills, "kernels": [vars(k) for k in self.kernels], "limits": self.limits,
                "expected": self.expected, "within_limits": self.within_limits, "violations": self.violations,
                "notes": self.notes, "codegen_seconds": round(self.codegen_seconds, 3),
                "nvcc_seconds": round(self.nvcc_seconds, 3)}


def target_limits(t: Target) -> dict[str, int]:
    """The per-block and per-thread limits a kernel must fit on ``t`` (the templates' parameters)."""
    return {"regs_per_thread": t.regs_per_thread, "regs_per_sm": t.regs_per_sm,
            "smem_per_block": t.smem_per_block, "threads_per_block": t.max_threads_per_block}


def compile_cuda(operator: Operator, config: Mapping[str, int], target: str | Target, *,
                 dtype: str | None = None, workdir: str | os.PathLike | None = None) -> CompiledKernel:
    """Build ``operator`` with ``config`` for ``target``'s arch, compile it with nvcc when present, and
    check ptxas's registers and shared memory against the limits the template's constraints used.

    An invalid configuration (one the solver would not produce) raises ``SpaceError``; a missing
    nvcc, or one that does not know the arch, gives ``compiled=False`` with the reason."""
    t = gpu_target(target)
    space = gpu_space(operator, t, dtype)
    cfg = {n: int(config[n]) for n in space.names if n in config}
    problems = space.check(cfg) if len(cfg) == len(space.names) else [
        f"missing {', '.join(sorted(set(space.names) - set(cfg)))}"]
    if problems:
        raise SpaceError(f"configuration {cfg} is not valid for {space.name}: {'; '.join(problems)}")
    start = time.perf_counter()
    mod = build(operator, cfg, dtype)
    built = time.perf_counter() - start
    expected = {k: float(space.evaluate(v, cfg)) for k, v in space.derived.items()
                if k in ("threads", "smem_bytes", "regs_per_thread")}
    if operator.op == "elementwise":
        expected["threads"] = float(cfg["THREADS"])
    result = compile_module(mod, t, name=str(operator), config=cfg, expected=expected, workdir=workdir)
    result.codegen_seconds += built
    result.notes = notes(operator, cfg)
    if result.compiled and "threads" in expected and result.threads != expected["threads"]:
        result.violations.append(f"threads per block {result.threads} != the template's {expected['threads']:g}")
    return result


def compile_module(mod: Any, target: str | Target, *, name: str = "main", config: Mapping[str, int] | None = None,
                   expected: Mapping[str, float] | None = None,
                   workdir: str | os.PathLike | None = None) -> CompiledKernel:
    """CUDA source of a scheduled TIR module for ``target``, compiled with nvcc (when on PATH), and the
    ptxas figures checked against the target's limits (any module: a template's, or a default schedule)."""
    tvm = require_tvm()
    t = gpu_target(target)
    start = time.perf_counter()
    try:
        source, dyn_smem, threads = _cuda_source(tvm, mod, t)
    except OpticError:
        raise
    except Exception as e:
        raise OpticError(f"TVM could not generate CUDA for {name} ({t.arch}): "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from None
    codegen = time.perf_counter() - start
    result = CompiledKernel(name=name, target=t.name, arch=t.arch, config=dict(config or {}), source=source,
                            compiled=False, threads=max(threads, default=0), dynamic_smem=max(dyn_smem, default=0),
                            limits=target_limits(t), expected=dict(expected or {}), codegen_seconds=codegen,
                            module=mod)
    cubin = compile_cubin(source, t.arch, name, workdir)
    result.nvcc_seconds, result.cu_path, result.kernels = cubin.seconds, cubin.cu_path, cubin.kernels
    if cubin.reason:
        result.reason = cubin.reason
        return result
    result.compiled = True
    result.violations = _violations(result)
    return result


def ptx(kernel: CompiledKernel) -> str:
    """The PTX of a compiled kernel's source (``nvcc -ptx`` for its arch): what to read to see which
    instructions the schedule produced (``mma.sync``, ``ldmatrix``, ``cp.async``). An ``OpticError``
    without nvcc, or when nvcc fails."""
    if shutil.which("nvcc") is None:
        raise OpticError("nvcc is not on PATH: no PTX (the CUDA source is the kernel's .source)")
    with tempfile.TemporaryDirectory(prefix="optic-ptx-") as d:
        cu, out = Path(d) / "kernel.cu", Path(d) / "kernel.ptx"
        cu.write_text(kernel.source)
        try:
            proc = subprocess.run(["nvcc", "-ptx", f"-arch={kernel.arch}", "-o", str(out), str(cu)],
                                  capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise OpticError(f"nvcc -ptx took over {NVCC_TIMEOUT_S} s for {kernel.name}") from None
        if proc.returncode != 0:
            raise OpticError(f"nvcc -ptx failed for {kernel.name} ({kernel.arch}): "
                             f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        return out.read_text()


def _violations(r: CompiledKernel) -> list[str]:
    lim, out = r.limits, []
    for k in r.kernels:
        if k.registers > lim["regs_per_thread"]:
            out.append(f"{k.name}: {k.registers} registers per thread > {lim['regs_per_thread']}")
        if r.threads and k.registers * r.threads > lim["regs_per_sm"]:
            out.append(f"{k.name}: {k.registers} registers x {r.threads} threads > {lim['regs_per_sm']} per SM")
        if k.static_smem + r.dynamic_smem > lim["smem_per_block"]:
            out.append(f"{k.name}: {k.static_smem} + {r.dynamic_smem} bytes of shared memory > "
                       f"{lim['smem_per_block']} per block")
    if r.threads > lim["threads_per_block"]:
        out.append(f"{r.threads} threads per block > {lim['threads_per_block']}")
    return out


def _cuda_source(tvm: Any, mod: Any, t: Target) -> tuple[str, list[int], list[int]]:
    """CUDA source of ``mod`` for ``t``, with each kernel's dynamic shared-memory bytes and threads per block.

    This is ``tvm.tirx.build`` up to the device code generator (TVM's build would also compile the
    source itself, through NVRTC, which nvcc does here instead)."""
    # The module, which ``tvm.tirx.build`` (the function) hides as an attribute.
    from tvm.tirx.build import split_host_device_mods

    target = tvm.target.Target({"kind": "cuda", "arch": t.arch}, host={"kind": "llvm"})
    if isinstance(mod, tvm.tirx.PrimFunc):
        mod = tvm.IRModule.from_expr(mod)
    mod = tvm.tirx.transform.BindTarget(target)(mod)
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    # Loops marked unrolled reach nvcc as ``#pragma unroll`` loops, not as unrolled TIR: a 4 x 16
    # thread tile over a 32-deep K tile is otherwise megabytes of source and minutes of nvcc. A
    # schedule that needs them unrolled in TIR (cp.async's wait counts must be constants) says so
    # with the function attribute LOWER_EXPLICIT_UNROLL, and LOWER_ASYNC_COPY turns its pipeline's
    # asynchronous stages into cp.async.
    wants = {key: any(bool(f.attrs.get(key, False)) for _, f in mod.functions_items() if f.attrs is not None)
             for key in (LOWER_EXPLICIT_UNROLL, LOWER_ASYNC_COPY)}
    config: dict[str, Any] = {"tirx.UnrollLoop": {"explicit_unroll": wants[LOWER_EXPLICIT_UNROLL]}}
    if wants[LOWER_ASYNC_COPY]:
        config["tirx.use_async_copy"] = True
    with target, tvm.transform.PassContext(config=config):
        mod = pipeline(mod)
        _, devices = split_host_device_mods(mod)
        device = [finalize_device()(m) for m in devices.values()]
    dyn, threads = [], []
    for dmod in device:
        for _, func in dmod.functions_items():
            d, th = _launch_figures(func)
            dyn.append(d)
            threads.append(th)
    sources = []
    for dmod in device:
        bf = tvm.get_global_func("target.build.cuda")
        sources.append(bf(dmod, target).inspect_source())
    return "\n".join(sources), dyn, threads


def _launch_figures(func: Any) -> tuple[int, int]:
    """``(dynamic shared-memory bytes, threads per block)`` of one device kernel, read from its TVMScript
    (TVM's Python API has no TIR visitor in 0.27): the ``shared.dyn`` allocations TVM merged, and the
    ``threadIdx`` extents it launches."""
    text = re.sub(r"T\.u?int(?:32|64)\((\d+)\)", r"\1", func.script())  # T.int64(1024) -> 1024
    dyn = 0
    for shape, dtype in _DYN_ALLOC.findall(text):
        dims = [int(d) for d in shape.replace(" ", "").strip(",").split(",") if d]
        dyn += math.prod(dims) * _DTYPE_BYTES[dtype]
    extents = {tag: int(n) for tag, n in _THREAD.findall(text)}
    return dyn, math.prod(extents.values()) if extents else 1


_DYN_ALLOC = re.compile(r'alloc_buffer\(\(([\d, ]+)\),\s*"(\w+)",\s*scope="shared\.dyn"')
_THREAD = re.compile(r'launch_thread\("(threadIdx\.[xyz])",\s*(\d+)\)')
_DTYPE_BYTES = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "int32": 4, "float64": 8}
