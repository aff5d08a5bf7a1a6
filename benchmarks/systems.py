"""The systems the benchmark compares: one small adapter each.

A :class:`System` has a name, ``available()`` (``None`` when it can run here, else the reason, e.g. a
missing package and how to install it) and ``prepare(model, inputs) -> Prepared``: everything that
happens once before steady-state calls (trace, export, compile, tune) happens in ``prepare``, so the
runner's clock around it is the preparation time. ``Prepared.call()`` runs the model once on inputs
already converted to the system's own format (what is timed); ``Prepared.outputs()`` runs it and
returns torch tensors (what is checked against eager).

Every system runs on this machine's CPU with the thread count the runner pinned
(``torch.get_num_threads()``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class Prepared:
    call: Callable[[], Any]  # one steady-state call on pre-converted inputs: what is timed
    outputs: Callable[[], Any]  # one call, outputs as torch tensors: what is checked
    info: dict[str, Any] = field(default_factory=dict)  # JSON-ready facts (capture path, export route)

    def __call__(self) -> Any:
        return self.call()


@dataclass(frozen=True)
class System:
    name: str
    description: str
    prepare: Callable[[nn.Module, tuple], Prepared]
    available: Callable[[], str | None] = lambda: None


def _missing(*modules: str, extra: str = "bench") -> str | None:
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install -e '.[{extra}]')"
    return None


def _same(fn: Callable[[], Any]) -> Prepared:
    return Prepared(call=fn, outputs=fn)


# -- eager PyTorch --------------------------------------------------------------------------------------
def _eager(model: nn.Module, inputs: tuple) -> Prepared:
    return _same(lambda: model(*inputs))


# -- optic ----------------------------------------------------------------------------------------------
def coverage(report: Any) -> dict[str, Any]:
    """What optic's report says about capture and passes, JSON-ready (the coverage table's row)."""
    return {
        "capture": report.capture,
        "passes": {p.name: dict(p.matched) for p in report.passes if p.changed and not p.rolled_back},
        "rolled_back": {p.name: p.reason or "" for p in report.passes if p.rolled_back},
        "skipped": {p.name: p.skipped for p in report.passes if p.skipped},
        "declined": sum(len(p.declined) for p in report.passes if not p.rolled_back),
        "notes": list(report.notes),
        "nodes": list(report.nodes),
        "final_error": report.final_error,
    }


def _optic(model: nn.Module, inputs: tuple, **kwargs: Any) -> Prepared:
    import optic

    opt = optic.optimize(model, inputs, target="cpu", **kwargs)
    p = _same(lambda: opt(*inputs))
    p.info["coverage"] = coverage(opt.report)
    return p


def _optic_tvm_available() -> str | None:
    import optic

    if "backend" not in inspect.signature(optic.optimize).parameters:
        return "not available yet (TVM backend lands with the lowering issue)"
    return _tvm_available()


# -- torch.compile (inductor) ---------------------------------------------------------------------------
def _compile_available() -> str | None:
    from optic.backend.whole import unavailable  # the same check: Inductor's C++ compiler

    return unavailable()


def _compile(model: nn.Module, inputs: tuple, freezing: bool = False) -> Prepared:
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()  # a fresh cache: earlier models would count against the recompile limit
    compiled = torch.compile(model)  # default mode, inductor
    # compile now (the first calls), cold: an on-disk cache hit would hide the real compile time.
    # freezing=True is what PyTorch recommends for CPU inference: weights become constants, so
    # Inductor prepacks them (MKL packed sgemm, oneDNN blocked weights) and folds what it can.
    with torch._inductor.config.patch(force_disable_caches=True, freezing=freezing), torch.no_grad():
        compiled(*inputs)
        compiled(*inputs)
    return Prepared(call=lambda: compiled(*inputs), outputs=lambda: compiled(*inputs),
                    info={"inductor_freezing": freezing})


# -- torch.fx optimize_for_inference (not in the default set) -------------------------------------------
def _fx_ofi(model: nn.Module, inputs: tuple) -> Prepared:
    from torch.fx.experimental.optimization import optimize_for_inference

    fast = optimize_for_inference(model)  # symbolic trace: fails on what fx cannot trace
    with torch.no_grad():
        fast(*inputs)
    return _same(lambda: fast(*inputs))


# -- ONNX Runtime ---------------------------------------------------------------------------------------
def _ort_available() -> str | None:
    return _missing("onnx", "onnxruntime")


def _onnx_export(model: nn.Module, inputs: tuple, path: Path) -> str:
    """Export with the dynamo exporter (needs onnxscript), falling back to the TorchScript one;
    returns the route taken and, on fallback, why."""
    dynamo_error = _missing("onnxscript")
    if dynamo_error is None:
        try:
            torch.onnx.export(model, inputs, str(path), dynamo=True, verbose=False)
            return "dynamo"
        except Exception as e:
            dynamo_error = first_line(e)
    torch.onnx.export(model, inputs, str(path), dynamo=False)
    return f"torchscript (dynamo export failed: {dynamo_error})"


def calibration_like(inputs: tuple, batches: int = 4, batch: int = 8, seed: int = 1) -> list[tuple]:
    """Random calibration batches shaped like ``inputs`` (float: normal; integer: uniform below the
    example's largest value, e.g. token ids), for the int8 systems: the zoo has no data."""
    g = torch.Generator().manual_seed(seed)

    def like(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            return torch.randn(shape, generator=g, dtype=t.dtype)
        return torch.randint(0, int(t.max()) + 1, shape, generator=g, dtype=t.dtype)
    return [tuple(like(t) for t in inputs) for _ in range(batches)]


def _optic_int8(model: nn.Module, inputs: tuple) -> Prepared:
    """optic's exact passes, then int8 layers (and bf16 ones, where this CPU has bf16 and they measure better)
    under a 1 % top-1 agreement budget (random calibration)."""
    import optic

    cal = calibration_like(inputs)
    opt = optic.optimize(model, inputs, target="cpu",
                         passes=["cleanup", "fold_norm", "fuse", "cleanup", "quantize", "precision", "cpu_tactics"],
                         budget=optic.Budget(max_drop=0.01, metric="agreement"),
                         calibration=[c if len(c) > 1 else c[0] for c in cal])
    p = _same(lambda: opt(*inputs))
    rows = (opt.report.budget or {}).get("actions", [])
    p.info["int8_layers"] = sum(r["pass"] == "quantize" and r["status"] == "kept" for r in rows)
    p.info["bf16_layers"] = sum(r["pass"] == "precision" and r["status"] == "kept" for r in rows)
    return p


def ort_session(path: Path):
    """An ONNX Runtime CPU session with all graph optimizations, on PyTorch's thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # ORT's threads spin after each run; alternated with PyTorch's OpenMP pool on few cores they
    # would steal each other's cores and inflate both timings
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort(model: nn.Module, inputs: tuple, int8: bool = False) -> Prepared:
    with tempfile.TemporaryDirectory(prefix="optic-bench-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        route = _onnx_export(model, inputs, path)
        if int8:
            path = ort_quantize(path, calibration_like(inputs), inputs[0].shape[0])
            route += "; int8: quantize_static (QDQ, per-channel int8 weights, uint8 activations, min-max)"
        session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    arrays = [t.numpy() for t in inputs]
    if len(names) != len(arrays):
        raise RuntimeError(f"the exported graph takes {len(names)} inputs ({names}); the model {len(arrays)}")
    feed = dict(zip(names, arrays, strict=True))
    p = Prepared(call=lambda: session.run(None, feed),
                 outputs=lambda: [torch.from_numpy(a) for a in session.run(None, feed)])
    p.info["export"] = route
    return p


def ort_quantize(path: Path, calibration: list[tuple], batch: int) -> Path:
    """ONNX Runtime's static int8 quantization of the model at ``path`` as its docs configure it for x86
    (QDQ, per-channel int8 weights, uint8 activations, min-max), calibrated on ``calibration`` (batches of
    the model's inputs) cut into pieces of ``batch`` samples, the batch size the model was exported at."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
    feeds = [{k: t[i:i + batch].numpy() for k, t in zip(names, c, strict=True)}
             for c in calibration for i in range(0, c[0].shape[0] - batch + 1, batch)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    pre = path.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(path), str(pre))
    except Exception:  # noqa: BLE001 - optional (shape inference): quantize the plain model
        pre = path
    out = path.with_suffix(".int8.onnx")
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


# -- TVM, default (untuned) build -----------------------------------------------------------------------
BROKEN_TVM_FFI = "0.1.15"  # apache-tvm-ffi 0.1.15.x segfaults serializing to JSON


def _tvm_available() -> str | None:
    missing = _missing("tvm", "tvm_ffi")
    if missing:
        return missing
    ffi = importlib.metadata.version("apache-tvm-ffi")
    if ffi.startswith(BROKEN_TVM_FFI):
        return f"apache-tvm-ffi {ffi} segfaults on JSON serialization (pip install apache-tvm-ffi==0.1.14.post1)"
    return None


def tvm_target() -> Any:
    """LLVM for this machine's CPU (its name as LLVM knows it, e.g. 'icelake-server'), else generic."""
    import tvm

    try:
        cpu = tvm.target.codegen.llvm_get_system_cpu()
    except Exception:  # an LLVM without host detection: generic code
        cpu = ""
    spec: dict[str, Any] = {"kind": "llvm"}
    if cpu and cpu != "generic":
        spec["mcpu"] = cpu
    return tvm.target.Target(spec)


def _tvm_default(model: nn.Module, inputs: tuple) -> Prepared:
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))  # read when the pool starts
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    exported = torch.export.export(model, inputs, strict=False)
    mod = from_exported_program(exported)  # PyTorch's default decomposition
    target = tvm_target()
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    main = vm["main"]
    args = [tvm.runtime.tensor(t.numpy()) for t in inputs]
    p = Prepared(call=lambda: main(*args), outputs=lambda: _tvm_to_torch(main(*args)))
    p.info["target"] = str(target)
    return p


def _tvm_to_torch(out: Any) -> Any:
    if hasattr(out, "numpy"):
        return torch.from_numpy(out.numpy())
    return [_tvm_to_torch(o) for o in out]


# -- the table ------------------------------------------------------------------------------------------
SYSTEMS: dict[str, System] = {s.name: s for s in [
    System("eager", "eager PyTorch", _eager),
    System("optic", "optic, exact passes, torch backend", _optic),
    System("optic-tvm", "optic, exact passes, TVM backend",
           lambda m, x: _optic(m, x, backend="tvm"), _optic_tvm_available),
    System("compile", "torch.compile, default mode (inductor)", _compile, _compile_available),
    System("compile-freezing", "torch.compile, inductor with freezing=True (PyTorch's CPU inference setting)",
           lambda m, x: _compile(m, x, freezing=True), _compile_available),
    System("ort", "ONNX Runtime, all graph optimizations", _ort, _ort_available),
    System("ort-int8", "ONNX Runtime static int8 (quantize_static, QDQ, per-channel), all graph optimizations",
           lambda m, x: _ort(m, x, int8=True), _ort_available),
    System("optic-int8", "optic, exact passes + int8 (and bf16) layers under a 1% top-1 agreement budget",
           _optic_int8),
    System("tvm-default", "TVM Relax, default untuned build", _tvm_default, _tvm_available),
    System("fx-ofi", "torch.fx.experimental.optimization.optimize_for_inference", _fx_ofi),
]}
DEFAULT = ["eager", "optic", "optic-tvm", "compile", "compile-freezing", "ort", "tvm-default"]


def get(name: str) -> System:
    try:
        return SYSTEMS[name]
    except KeyError:
        raise KeyError(f"no system '{name}'; systems: {', '.join(SYSTEMS)}") from None


def first_line(e: BaseException) -> str:
    """``Type: first non-empty line of the message`` (what the tables show for a failure)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__

