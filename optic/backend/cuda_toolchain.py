"""The CUDA toolchain: ``nvcc -cubin -Xptxas -v`` on a CUDA source, and what ptxas reports it allocated.

No GPU is needed: ptxas reports registers, spills and static shared memory per ``__global__``
function at compile time. Without nvcc on PATH nothing is compiled and the result says so; an arch
nvcc does not know, or a compile that fails or runs past :data:`NVCC_TIMEOUT_S`, is a reason, never
an exception. (The versions that key the tuning database are ``optic.autotune.toolchain``'s: autotune
imports nothing of the backend.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["NVCC_TIMEOUT_S", "CubinBuild", "PtxasKernel", "compile_cubin", "nvcc_version", "parse_ptxas"]

NVCC_TIMEOUT_S = 600


@dataclass(frozen=True)
class PtxasKernel:
    """What ptxas allocated for one ``__global__`` function (``-Xptxas -v``)."""

    name: str
    registers: int
    static_smem: int  # bytes of __shared__ arrays; dynamic shared memory is not in ptxas's figure
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0


@dataclass
class CubinBuild:
    """One nvcc run: the kernels ptxas reported, or ``reason`` (non-empty) why nothing was compiled."""

    kernels: list[PtxasKernel] = field(default_factory=list)
    reason: str = ""
    seconds: float = 0.0  # nvcc's wall time
    cu_path: str | None = None  # the source file, when written to a directory the caller keeps


def compile_cubin(source: str, arch: str, name: str = "kernel",
                  workdir: str | os.PathLike | None = None) -> CubinBuild:
    """Compile ``source`` for ``arch`` (``sm_XX``) with nvcc and read ptxas's report. ``workdir``: where
    the ``.cu`` and ``.cubin`` files go (kept); by default a temporary directory (removed)."""
    if shutil.which("nvcc") is None:
        return CubinBuild(reason="not compiled: nvcc is not on PATH (the CUDA source was generated)")
    out = CubinBuild()
    with _workdir(workdir) as d:
        cu = Path(d) / f"{_file_stem(name)}_{arch}.cu"
        cu.write_text(source)
        out.cu_path = str(cu) if workdir is not None else None
        start = time.perf_counter()
        try:
            proc = subprocess.run(["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o",
                                   str(cu.with_suffix(".cubin")), str(cu)], capture_output=True, text=True,
                                  timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            out.reason = f"nvcc took over {NVCC_TIMEOUT_S} s for {arch}; not compiled"
            return out
        finally:
            out.seconds = time.perf_counter() - start
    if proc.returncode != 0:
        out.reason = f"nvcc failed for {arch}: {_nvcc_error(proc.stderr or proc.stdout)}"
        return out
    out.kernels = parse_ptxas(proc.stderr + proc.stdout)
    if not out.kernels:
        out.reason = "nvcc succeeded but ptxas reported no kernel"
    return out


class _workdir:
    """The given directory (kept), or a temporary one (removed)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path, self._tmp = path, None

    def __enter__(self) -> str:
        if self.path is not None:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            return str(self.path)
        self._tmp = tempfile.TemporaryDirectory(prefix="optic-cuda-")
        return self._tmp.name

    def __exit__(self, *exc: Any) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80] or "kernel"


def _nvcc_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "fatal" in ln.lower()]
    return (errors or lines or ["(no message)"])[0][:300]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str) -> list[PtxasKernel]:
    """Per-kernel figures from ``ptxas -v`` output (``Compiling entry function 'f'`` then its lines)."""
    out: list[PtxasKernel] = []
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            if current:
                out.append(PtxasKernel(**current))
            current = {"name": m.group(1), "registers": 0, "static_smem": 0}
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["static_smem"] = int(m.group(2) or 0)
    if current:
        out.append(PtxasKernel(**current))
    return out


def nvcc_version() -> str | None:
    """``nvcc --version``'s release line, or None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    proc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=60)
    m = re.search(r"release [^\n]*", proc.stdout)
    return m.group(0) if m else proc.stdout.strip().splitlines()[-1]
