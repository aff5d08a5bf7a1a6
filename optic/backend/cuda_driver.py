"""Running a cubin nvcc built here on the GPU PyTorch uses, through the CUDA driver API (ctypes, no extra package).

TVM's PyPI wheel has no CUDA runtime, so the kernels optic generates for a GPU are compiled to cubins
with nvcc (:mod:`.cuda_toolchain`) and launched here: ``cuModuleLoadData`` in the context PyTorch made
current, ``cuLaunchKernel`` on PyTorch's current stream with the tensors' device pointers. What a launch
needs besides the cubin (the kernel's name, its parameters in order, grid, block and dynamic shared
memory) is read from the CUDA source and the scheduled TIR (:func:`launch_of`), so nothing of TVM's
runtime is needed at call time.

``unavailable()`` says why nothing can run (no GPU, no driver library); a caller falls back to
PyTorch's op with that note rather than raising at call time.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from typing import Any

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_STATIC_SMEM_LIMIT = 48 * 1024  # above this, dynamic shared memory must be opted into per function
_driver: Any = None


class DriverError(RuntimeError):
    """A CUDA driver call that failed, with the driver's error name."""


def _lib() -> Any:
    global _driver
    if _driver is None:
        for name in ("libcuda.so.1", "libcuda.so"):
            try:
                _driver = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise DriverError("the CUDA driver library (libcuda.so) is not on this machine")
        _check(_driver.cuInit(0), "cuInit")
    return _driver


def _check(code: int, what: str) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        if _driver is not None:
            _driver.cuGetErrorName(code, ctypes.byref(name))
        raise DriverError(f"{what} failed: {(name.value or b'').decode() or code}")


def unavailable() -> str | None:
    """Why no cubin can run here (None when one can)."""
    import torch

    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA GPU here"
    try:
        _lib()
    except DriverError as e:
        return str(e)
    return None


@dataclass(frozen=True)
class Launch:
    """How to launch one kernel: its entry name, parameters (names, in the order the kernel takes them, and
    whether each is a pointer), grid and block dimensions, dynamic shared-memory bytes."""

    kernel: str
    params: tuple[tuple[str, bool], ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_smem: int = 0


_ENTRY = re.compile(r'extern "C" __global__ void(?: __launch_bounds__\(\d+\))? (\w+)\(([^)]*)\)')
_LAUNCH = re.compile(r'launch_thread\("((?:blockIdx|threadIdx)\.[xyz])",\s*(\d+)\)')
_BINDING = re.compile(r'T\.thread_binding\((\d+),\s*thread="((?:blockIdx|threadIdx)\.[xyz])"\)')


def kernel_entries(source: str) -> list[tuple[str, tuple[tuple[str, bool], ...]]]:
    """Each ``__global__`` function of a CUDA source (declared, then defined: once): its name and parameters
    (name, is a pointer) in order. TVM names a buffer's pointer ``<buffer>_ptr``: the buffer's name is kept."""
    out: dict[str, tuple[tuple[str, bool], ...]] = {}
    for name, params in _ENTRY.findall(source):
        parsed = []
        for p in (p.strip() for p in params.split(",") if p.strip()):
            pname = re.sub(r"[^\w]", " ", p).split()[-1]
            parsed.append((pname.removesuffix("_ptr"), "*" in p))
        out.setdefault(name, tuple(parsed))
    return list(out.items())


def launch_of(source: str, tir: str, dynamic_smem: int) -> Launch:
    """The launch of the one kernel in ``source``, with grid and block read from its TIR (TVMScript text of the
    scheduled or the device function: ``T.thread_binding`` or ``launch_thread`` extents)."""
    entries = kernel_entries(source)
    if len(entries) != 1:
        raise ValueError(f"expected one __global__ function in the CUDA source, found {len(entries)}")
    text = re.sub(r"T\.u?int(?:32|64)\((\d+)\)", r"\1", tir)
    ext = {tag: int(n) for tag, n in _LAUNCH.findall(text)}
    ext.update({tag: int(n) for n, tag in _BINDING.findall(text)})
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) for a in "xyz")
    name, params = entries[0]
    return Launch(name, params, grid, block, dynamic_smem)  # type: ignore[arg-type]


class Kernel:
    """One kernel of a loaded cubin, launched on PyTorch's current stream."""

    def __init__(self, cubin: bytes, launch: Launch):
        import torch

        lib = _lib()
        torch.cuda.init()
        torch.cuda.current_stream().synchronize()  # PyTorch's primary context exists and is current
        ctx = ctypes.c_void_p()
        _check(lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if not ctx.value:
            raise DriverError("no current CUDA context (PyTorch has not initialised the GPU)")
        self._image = ctypes.create_string_buffer(cubin, len(cubin))  # kept alive with the module
        self._module, self._func = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cuModuleLoadData(ctypes.byref(self._module), self._image), "cuModuleLoadData")
        _check(lib.cuModuleGetFunction(ctypes.byref(self._func), self._module, launch.kernel.encode()),
               f"cuModuleGetFunction({launch.kernel})")
        if launch.dynamic_smem > _STATIC_SMEM_LIMIT:
            _check(lib.cuFuncSetAttribute(self._func, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                          ctypes.c_int(launch.dynamic_smem)), "cuFuncSetAttribute")
        self.launch = launch

    def __call__(self, **args: Any) -> None:
        """Launch with ``args`` by parameter name: tensors (their device pointers) for pointers, ints else."""
        import torch

        holders: list[Any] = []
        for name, pointer in self.launch.params:
            value = args[name]
            if pointer:
                if not (isinstance(value, torch.Tensor) and value.is_cuda):
                    raise ValueError(f"kernel parameter {name} needs a CUDA tensor")
                holders.append(ctypes.c_void_p(value.data_ptr()))
            else:
                holders.append(ctypes.c_int32(int(value)))
        params = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in holders])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        g, b = self.launch.grid, self.launch.block
        _check(_lib().cuLaunchKernel(self._func, g[0], g[1], g[2], b[0], b[1], b[2], self.launch.dynamic_smem,
                                     stream, params, None), f"cuLaunchKernel({self.launch.kernel})")
