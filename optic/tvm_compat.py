"""TVM as optic uses it: the one import point, targets, and the spellings that moved between releases.

TVM is an optional dependency (``pip install 'optic[tvm]'``); nothing imports it until lowering
starts, and :func:`require_tvm` turns its absence into an :class:`~optic.errors.LoweringError`.

Targets: optic names (``"cpu"``, ``"h100"``) and optic :class:`~optic.targets.Target` rows map to
TVM targets (the host CPU becomes ``{"kind": "llvm", "mcpu": <LLVM's name for this CPU>}``, a GPU
row ``{"kind": "cuda", "arch": "sm_XX"}``); TVM target kinds (``"llvm"``, ``"cuda"``), TVM config
dicts and ``tvm.target.Target`` objects pass through. Since TVM 0.27 a target is built from a dict,
not a string.

API moves this module absorbs (TVM 0.27 / tvm-ffi 0.1): Relax vars are named by ``.name``
(``.name_hint`` before), a value's type is ``.ty`` (``.struct_info`` before), op attributes are
objects whose fields ``dir()`` lists.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .errors import LoweringError, UnknownTargetError
from .threads import size_tvm_pool

INSTALL_HINT = "pip install 'optic[tvm]'"


size_tvm_pool()  # before any TVM kernel runs: the pool reads its variables when it starts


@functools.cache
def require_tvm() -> Any:
    """The ``tvm`` module, or a LoweringError that says how to install it."""
    try:
        import tvm
        import tvm.relax  # noqa: F401  (the importer and passes live here; import errors show now)
    except ImportError as e:
        raise LoweringError(
            f"lowering to TVM needs Apache TVM, which is not installed ({e}). Install it with "
            f"{INSTALL_HINT} (apache-tvm 0.27 with apache-tvm-ffi 0.1.14.post1).") from None
    except OSError as e:  # the package is there but its shared library does not load
        raise LoweringError(f"Apache TVM is installed but its library does not load ({e}); reinstall it "
                            f"with {INSTALL_HINT}.") from None
    return tvm


def tvm_available() -> bool:
    try:
        require_tvm()
    except LoweringError:
        return False
    return True


# -- targets ------------------------------------------------------------------------------------------
@functools.cache
def host_cpu() -> str | None:
    """LLVM's name for this machine's CPU (``"emeraldrapids"``, ``"znver4"``), if LLVM knows it."""
    from tvm.target import codegen

    try:
        cpu = codegen.llvm_get_system_cpu()
        return cpu if cpu and codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()) else None
    except Exception:  # an LLVM-less build of TVM: generic code is still correct code
        return None


def tvm_tensors(*tensors: Any) -> tuple:
    """PyTorch ``tensors`` as TVM tensors over the same memory: a kernel's arguments converted once, where
    passing the PyTorch tensor would convert it on every call."""
    require_tvm()
    import tvm_ffi

    return tuple(tvm_ffi.from_dlpack(t) for t in tensors)


def host_target(opt_level: int | None = None) -> Any:
    """The TVM target for code that runs here: LLVM tuned for this CPU (``opt_level``: LLVM's, default 3)."""
    tvm = require_tvm()
    config: dict[str, Any] = {"kind": "llvm"}
    if host_cpu():
        config["mcpu"] = host_cpu()
    if opt_level is not None:
        config["opt-level"] = int(opt_level)
    return tvm.target.Target(config)


def tvm_target(target: Any) -> Any:
    """A ``tvm.target.Target`` for an optic target name or row, a TVM kind, a TVM config dict or Target.

    Raises UnknownTargetError for a name that is neither an optic target nor a TVM target kind.
    """
    tvm = require_tvm()
    from . import targets

    if isinstance(target, tvm.target.Target):
        return target
    if target is None:
        return host_target()
    if isinstance(target, dict):
        return _from_config(tvm, dict(target))
    if isinstance(target, targets.Target):
        return _from_row(tvm, target)
    if isinstance(target, str):
        if target.strip().lower() in ("llvm", "host", "cpu"):
            return host_target()
        if target in tvm.target.Target.list_kinds():
            return _from_config(tvm, {"kind": target})
        try:
            return _from_row(tvm, targets.get(target))
        except UnknownTargetError:
            raise UnknownTargetError(target, [*targets.names(), *tvm.target.Target.list_kinds()]) from None
    raise TypeError(f"a lowering target is a name, an optic Target, a TVM config dict or a tvm.target.Target; "
                    f"got {type(target).__name__}")


def _from_row(tvm: Any, row: Any) -> Any:
    if row.kind == "cpu":
        return host_target()
    if row.kind == "gpu" and row.arch:
        return tvm.target.Target({"kind": "cuda", "arch": row.arch})
    raise LoweringError(f"target {row.name} ({row.kind}) has no TVM code generator in optic yet.")


def _from_config(tvm: Any, config: dict[str, Any]) -> Any:
    kind = config.get("kind")
    kinds = list(tvm.target.Target.list_kinds())
    if kind not in kinds:
        raise UnknownTargetError(str(kind), kinds)
    if kind == "llvm" and "mcpu" not in config and host_cpu():
        config["mcpu"] = host_cpu()
    try:
        return tvm.target.Target(config)
    except Exception as e:  # TVM validates the other keys (an unknown "arch", a misspelt option)
        raise LoweringError(f"TVM rejected the target {config}: {str(e).strip().splitlines()[0]}") from None


# -- Relax and TIR spellings ------------------------------------------------------------------------------
def var_name(var: Any) -> str:
    return getattr(var, "name", None) or var.name_hint


def value_type(expr: Any) -> Any:
    return getattr(expr, "ty", None) if hasattr(expr, "ty") else expr.struct_info


def tensor_types(ty: Any) -> list[tuple[tuple[int, ...], str]]:
    """``(shape, dtype)`` of every tensor in a Relax type (a tensor or a tuple of them), in order."""
    if hasattr(ty, "fields"):
        return [t for f in ty.fields for t in tensor_types(f)]
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        return []
    return [(tuple(int(s) for s in shape.values), str(ty.dtype))]


def attrs_dict(attrs: Any) -> dict[str, Any]:
    """The fields of an op's attributes as plain Python (ints, floats, strings, lists)."""
    if attrs is None:
        return {}
    out = {}
    for name in dir(attrs):
        if name.startswith("_") or name in ("id_", "span"):
            continue
        value = getattr(attrs, name, None)
        if callable(value):
            continue
        out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "value") and isinstance(value.value, int | float):  # IntImm, FloatImm
        return value.value
    if isinstance(value, list | tuple) or type(value).__name__ == "Array":
        return [_plain(v) for v in value]
    return str(value)


# -- data exchange ----------------------------------------------------------------------------------------
# TVM's kernels assume their buffers start on a 64-byte boundary (TVM allocates so: kAllocAlignment), and
# LLVM emits aligned vector loads for them: a PyTorch view that starts elsewhere (a slice, a tensor made from
# a NumPy array) made a kernel fault and killed the process
ALIGNMENT = 64


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on a :data:`ALIGNMENT` boundary: itself where it is, else a copy (PyTorch's
    allocator aligns new tensors to 64 bytes)."""
    t = t.detach().contiguous()
    if t.data_ptr() % ALIGNMENT:
        t = t.clone()
    return t


def to_tvm(t: torch.Tensor) -> Any:
    """A TVM view of a tensor (DLPack, no copy unless the tensor is not contiguous or not aligned)."""
    tvm = require_tvm()
    return tvm.runtime.from_dlpack(aligned(t))


def to_torch(x: Any) -> torch.Tensor:
    """A torch view of a TVM tensor (DLPack, no copy)."""
    return torch.from_dlpack(x)


def structural_hash(obj: Any) -> int:
    """TVM's structural hash (it moved from ``tvm.ir`` to ``tvm_ffi`` in 0.27)."""
    tvm = require_tvm()
    fn = getattr(tvm.ir, "structural_hash", None)
    if fn is None:
        import tvm_ffi

        fn = tvm_ffi.structural_hash
    return int(fn(obj))
