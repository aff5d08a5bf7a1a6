"""The versions of everything that turns a configuration into machine code and times it.

They enter every tuning-database key (as Triton's cache key hashes the compiler's version): a
record measured with another TVM, LLVM, PyTorch or code generator is not reused.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def toolchain() -> dict[str, str | int | None]:
    """``{"tvm": ..., "tvm_ffi": ..., "llvm": ..., "torch": ..., "python": ..., "codegen": ...}``."""
    import torch

    from .measure import DEFAULT_BUILDER
    from .worker import load_builder

    codegen_version = load_builder(DEFAULT_BUILDER.partition(":")[0] + ":CODEGEN_VERSION")

    llvm = None
    try:
        from tvm.target import codegen

        llvm = str(codegen.llvm_version_major())
    except Exception:  # TVM without LLVM, or no TVM: then nothing is built here anyway
        pass
    return {"tvm": _dist("apache-tvm"), "tvm_ffi": _dist("apache-tvm-ffi"), "llvm": llvm,
            "torch": torch.__version__, "python": platform.python_version(), "codegen": codegen_version}
