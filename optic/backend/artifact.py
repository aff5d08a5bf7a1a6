"""GPU artifacts: ``optimize(model, x, target="a100", backend="tvm")`` when the target is not this machine.

The same kernels as the CPU backend's (every dense fp32 linear with its bias, activation and residual
add, see :mod:`optic.backend.generated`) are generated for the GPU: the GPU template's space is
solved, the cost model picks the configuration (nothing can be measured here), TVM emits CUDA for
the target's architecture, and where ``nvcc`` is present each kernel is compiled to a cubin and
ptxas's registers and shared memory are checked against the limits the template's constraints
allowed (a kernel over them is left out). The kernels are built into one library
(``tvm.compile`` with the CUDA target, host code by LLVM), saved with the graph::

    model.artifact/
        manifest.json    target, arch, toolchain, one entry per kernel (operator, layers, config,
                         ptxas registers / shared memory / threads and the limits)
        kernels.so       TVM library: one function per kernel (k0, k1, ...)
        model.pt         the optimized graph (torch.save of the GraphModule); each kernel is a
                         GPUKernel module holding its weights, nvcc's cubin with its launch (grid,
                         block, shared memory, parameters) and PyTorch's own ops for the layer
        cuda/*.cu        the CUDA sources

The optimized module ``optimize`` returns runs this graph (the kernels run inside it, no save/load
round-trip needed); ``optic.load_artifact(path)`` returns it from disk. On CUDA tensors each GPUKernel
loads its cubin through the CUDA driver (:mod:`.cuda_driver`: no CUDA build of TVM needed; the TVM
library is the second way), checks it against PyTorch's ops for the layer on the first call, times both
and keeps the faster (never slower because of a kernel it could have avoided). A kernel that cannot run
(no GPU, a cubin for another architecture, no driver) runs PyTorch's ops with a note, never an error at
call time. On CPU tensors it runs PyTorch's ops, so the artifact's graph can be checked on any machine
(``optimize`` does so before returning it). Loading unpickles ``model.pt``: load only artifacts you
trust, as with any pickle.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .. import ir
from ..errors import OpticError
from ..pipeline.timing import seconds_per_call
from ..pipeline.verify import compare

log = logging.getLogger("optic.backend")

__all__ = ["GPUArtifact", "GPUKernel", "build_gpu_artifact", "load_artifact"]

MANIFEST, LIBRARY, GRAPH = "manifest.json", "kernels.so", "model.pt"
_TACTIC_CALLS = 20


class GPUKernel(nn.Module):
    """One generated CUDA kernel in the graph, with PyTorch's ops for the same layer beside it.

    On CUDA tensors the kernel runs from its cubin through the CUDA driver (:mod:`.cuda_driver`; no CUDA
    build of TVM needed), or from the artifact's TVM library; where neither can run (no GPU, a GPU of
    another architecture, no driver) the layer runs PyTorch's ops and :attr:`note` says why, never an
    exception at call time. Calls that need gradients run PyTorch's ops too (the kernel has no backward)."""

    def __init__(self, symbol: str, fallback: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                 in_shape: tuple, out_shape: tuple, result_shape: tuple, description: str,
                 cubin: bytes | None = None, launch: Any = None, arch: str | None = None):
        super().__init__()
        self.symbol, self.fallback = symbol, fallback
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.in_shape, self.out_shape, self.result_shape = tuple(in_shape), tuple(out_shape), tuple(result_shape)
        self.description = description
        self.cubin, self.launch, self.arch = cubin, launch, arch  # nvcc's cubin and how to launch it
        self.choice: str | None = None  # "generated" or "torch", decided on the first CUDA call
        self.note: str | None = None  # why the generated kernel does not run here, once a CUDA call found out
        self.timings_ms: dict[str, float] = {}
        self.library: str | None = None  # set by load_artifact
        self._fn: Any = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fn"] = None  # the loaded function is not picklable; it is loaded again on use
        return state

    def _runner(self) -> Any:
        """``run(A=, B=, bias=, residual=, C=)``: the generated kernel, from the cubin or the TVM library;
        an :class:`OpticError` saying why neither can run here."""
        if self._fn is not None:
            return self._fn
        reasons = []
        if self.cubin is not None and self.launch is not None:
            from . import cuda_driver

            why = cuda_driver.unavailable()
            if why is None:
                try:
                    kernel = cuda_driver.Kernel(self.cubin, self.launch)
                    self._fn = kernel
                    return kernel
                except cuda_driver.DriverError as e:
                    why = f"{e} (cubin for {self.arch})"
            reasons.append(why)
        if self.library is not None:
            from ..tvm_compat import require_tvm

            try:
                fn = _load_library(require_tvm(), self.library)[self.symbol]
                order = ["A", "B"] + ([] if self.bias is None else ["bias"])

                def run(**a: Any) -> None:
                    fn(*[a[n] for n in order], *[v for k, v in a.items() if k.startswith("residual")], a["C"])
                self._fn = run
                return run
            except Exception as e:  # noqa: BLE001 - a runtime without CUDA: the reason, then PyTorch's ops
                reasons.append(f"the TVM library ({self.library}) cannot run it: {str(e).splitlines()[0][:120]}; "
                               "that needs a TVM runtime built with CUDA (the PyPI wheel has none)")
        raise OpticError("the generated CUDA kernel cannot run here: " + ("; ".join(reasons) or "it has no cubin and no "
                         "library (load the artifact with optic.load_artifact(path))"))

    def _generated(self, x: torch.Tensor, residual: tuple) -> torch.Tensor:
        out = torch.empty(self.out_shape, dtype=x.dtype, device=x.device)
        args = {"A": x.reshape(self.in_shape).contiguous(), "B": self.weight, "C": out}
        if self.bias is not None:
            args["bias"] = self.bias
        for i, r in enumerate(residual):
            args["residual" if i == 0 else f"residual_{i}"] = r.reshape(self.out_shape).contiguous()
        self._runner()(**args)
        return out.view(self.result_shape)

    def forward(self, x: torch.Tensor, *residual: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda or (torch.is_grad_enabled() and (x.requires_grad or any(r.requires_grad for r in residual))):
            return self.fallback(x, *residual)
        return self._on_device(x, residual)

    def _on_device(self, x: torch.Tensor, residual: tuple) -> torch.Tensor:
        if self.choice is None:
            self._decide(x, residual)
        if self.choice == "torch":
            return self.fallback(x, *residual)
        return self._generated(x, residual)

    @torch.no_grad()
    def _decide(self, x: torch.Tensor, residual: tuple) -> None:
        """Check the generated kernel against PyTorch's ops on this call's values, then time both (CUDA events,
        alternated); keep the faster. A kernel that cannot run, fails or disagrees is never used: its note
        says why."""
        try:
            self._runner()
        except OpticError as e:
            self.choice, self.note = "torch", str(e)
            if not _WARNED.get(self.note):
                _WARNED[self.note] = True
                log.warning("%s: PyTorch's ops run the layer instead", self.note)
            return
        expected = self.fallback(x, *residual)
        try:
            got = self._generated(x, residual)
        except Exception as e:  # noqa: BLE001 - a launch that fails: PyTorch's ops, with the reason
            self.choice, self.note = "torch", f"the generated kernel failed: {str(e).splitlines()[0]}"
            return
        check = compare(expected.float().cpu(), got.float().cpu(), 1e-3 if x.dtype == torch.float32 else 1e-2)
        if not check.ok:
            self.choice, self.note = "torch", f"the generated kernel disagrees with PyTorch's ops ({check})"
            return
        fns = {"generated": lambda: self._generated(x, residual), "torch": lambda: self.fallback(x, *residual)}
        totals = dict.fromkeys(fns, 0.0)
        for _ in range(3):
            for name, fn in fns.items():
                totals[name] += seconds_per_call(fn, _TACTIC_CALLS) * 1e3  # CUDA events (optic.pipeline.timing)
        self.timings_ms = {k: v / 3 for k, v in totals.items()}
        self.choice = "generated" if totals["generated"] < 0.97 * totals["torch"] else "torch"

    def extra_repr(self) -> str:
        return f"{self.symbol}: {self.description}" + (f" (runs PyTorch's ops: {self.note})" if self.note else "")


_WARNED: dict[str, bool] = {}  # one warning per reason a kernel cannot run, not one per layer
_LIBRARIES: dict[str, Any] = {}


def _load_library(tvm: Any, path: str) -> Any:
    if path not in _LIBRARIES:
        _LIBRARIES[path] = tvm.runtime.load_module(path)
    return _LIBRARIES[path]


@dataclass
class ArtifactKernel:
    symbol: str
    operator: str
    layers: list[str]
    config: dict[str, int]
    compiled: dict[str, Any] = field(default_factory=dict)  # ptxas figures and limits (CompiledKernel.as_dict)


@dataclass
class GPUArtifact:
    """What ``optimize(..., backend="tvm")`` built for a GPU target; ``save(path)`` writes it."""

    target: str
    arch: str
    program: Any  # Program whose graph holds GPUKernel modules
    library: Any  # tvm Executable of every kernel (after unpickling: its exported shared library's bytes)
    kernels: list[ArtifactKernel]
    left_out: list[str]  # "layer: why" for every layer that stays with PyTorch
    sources: dict[str, str]  # file name -> CUDA source
    toolchain: dict[str, Any]
    seconds: float = 0.0

    # A TVM library neither deep-copies nor pickles: a copy shares it (it is never changed), a pickle
    # carries the shared library's bytes, which save() writes as they are.
    def __deepcopy__(self, memo: dict) -> GPUArtifact:
        import copy

        state = {k: (v if k == "library" else copy.deepcopy(v, memo)) for k, v in self.__dict__.items()}
        clone = object.__new__(GPUArtifact)
        clone.__dict__.update(state)
        return clone

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not isinstance(state["library"], bytes):
            with tempfile.TemporaryDirectory() as tmp:
                self.library.export_library(str(Path(tmp) / LIBRARY))
                state["library"] = (Path(tmp) / LIBRARY).read_bytes()
        return state

    def manifest(self) -> dict[str, Any]:
        return {"format": "optic-gpu-artifact/1", "target": self.target, "arch": self.arch,
                "toolchain": self.toolchain, "kernels": [k.__dict__ for k in self.kernels],
                "left_in_pytorch": self.left_out, "build_seconds": round(self.seconds, 2)}

    def save(self, path: str | Path) -> Path:
        """Write the artifact directory (see the module docstring); returns its path."""
        out = Path(path)
        if out.exists() and not (out / MANIFEST).exists():
            raise OpticError(f"{out} exists and is not an optic artifact: give a new directory (e.g. model.artifact)")
        tmp = Path(tempfile.mkdtemp(prefix=".optic-artifact-", dir=out.parent if out.parent.exists() else None))
        try:
            if isinstance(self.library, bytes):  # unpickled: the library as it was exported
                (tmp / LIBRARY).write_bytes(self.library)
            else:
                self.library.export_library(str(tmp / LIBRARY))
            _save_graph(self.program.gm, tmp / GRAPH)
            (tmp / "cuda").mkdir()
            for name, text in self.sources.items():
                (tmp / "cuda" / name).write_text(text)
            (tmp / MANIFEST).write_text(json.dumps(self.manifest(), indent=2, default=str))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise OpticError(f"cannot write the artifact {out}: {e.strerror or e}") from None
        return out

    def summary(self) -> str:
        regs = max((k.compiled.get("registers", 0) for k in self.kernels), default=0)
        smem = max((k.compiled.get("smem", 0) for k in self.kernels), default=0)
        checked = sum(k.compiled.get("compiled", False) for k in self.kernels)
        return (f"{len(self.kernels)} CUDA kernel(s) for {self.target} ({self.arch}), {checked} compiled by nvcc with "
                f"ptxas within the limits (max {regs} registers/thread, {smem:,} B shared memory/block); "
                f"{len(self.left_out)} layer(s) stay with PyTorch (cuBLAS/cuDNN); built in {self.seconds:.1f} s. "
                "Save it with result.artifact.save('model.artifact') (CLI: -o model.artifact).")


def _save_graph(gm: fx.GraphModule, path: Path) -> None:
    """torch.save of the GraphModule. Pickling stores its code and re-traces it on load with the tracer that
    made it: torch.export's tracer cannot be rebuilt that way, and a plain one gives the same graph."""
    saved = [(m, m._tracer_cls, m._tracer_extras) for m in gm.modules() if isinstance(m, fx.GraphModule)]
    try:
        for m, _, _ in saved:
            m._tracer_cls, m._tracer_extras = None, {}
        torch.save(gm, path)
    finally:
        for m, cls, extras in saved:
            m._tracer_cls, m._tracer_extras = cls, extras


def load_artifact(path: str | Path, map_location: Any = None) -> nn.Module:
    """The model of an artifact written by :meth:`GPUArtifact.save`. Unpickles ``model.pt``: trusted files only."""
    root = Path(path)
    if not (root / MANIFEST).is_file():
        raise OpticError(f"{root} is not an optic artifact (no {MANIFEST}); write one with "
                         "optic.optimize(..., target='a100', backend='tvm').artifact.save(path)")
    gm = torch.load(root / GRAPH, weights_only=False, map_location=map_location)
    for m in gm.modules():
        if isinstance(m, GPUKernel):
            m.library = str((root / LIBRARY).resolve())
    gm.manifest = json.loads((root / MANIFEST).read_text())
    return gm


def _cubin_and_launch(compiled: Any) -> tuple[bytes | None, Any]:
    """nvcc's cubin of a compiled kernel and how to launch it (:mod:`.cuda_driver`); ``(None, None)`` when nvcc
    did not compile it (the TVM library remains, where a CUDA build of TVM runs it)."""
    from . import cuda_driver

    if not compiled.compiled or compiled.cu_path is None:
        return None, None
    cubin = Path(compiled.cu_path).with_suffix(".cubin")
    if not cubin.is_file():
        return None, None
    return cubin.read_bytes(), cuda_driver.launch_of(compiled.source, compiled.module.script(), compiled.dynamic_smem)


def build_gpu_artifact(program: Any, target: Any, tolerance: float,
                       progress: Any = None) -> tuple[GPUArtifact | None, list[str]]:
    """Generate, compile and check the GPU kernels of ``program`` for ``target`` (see the module docstring).
    Returns the artifact (None when no layer gets a kernel) and the layers left with PyTorch, with why."""
    from optic.autotune.space import SpaceError
    from optic.autotune.toolchain import toolchain
    from optic.backend.codegen_cuda import compile_cuda, model_config
    from optic.backend.generated import kernel_sites, replace_sites
    from optic.ir.rewrite import RuleStats

    from ..tvm_compat import require_tvm

    tvm = require_tvm()
    start = time.perf_counter()
    result = program.clone()
    gm = result.gm
    stats = RuleStats()
    sites = kernel_sites(gm, stats)
    left = [f"{n}: {why}" for _, n, why in stats.declined]
    groups: dict[str, list[Any]] = {}
    for s in sites:
        groups.setdefault(s.operator.key, []).append(s)
    funcs, kernels, sources, chosen, runnable = {}, [], {}, [], {}
    with tempfile.TemporaryDirectory(prefix="optic-cuda-") as work:
        for i, group in enumerate(groups.values()):
            site = group[0]
            names = [s.op.node.name for s in group]
            if progress is not None:
                progress(f"CUDA kernel {site.operator}", i, len(groups))
            try:
                config = model_config(site.operator, target)
                compiled = compile_cuda(site.operator, config, target, workdir=work)
            except (SpaceError, OpticError) as e:
                left += [f"{n}: {str(e).splitlines()[0][:160]}" for n in names]
                continue
            if compiled.compiled and not compiled.within_limits:
                left += [f"{n}: ptxas reports {'; '.join(compiled.violations)}" for n in names]
                continue
            symbol = f"k{len(kernels)}"
            funcs[symbol] = compiled.module["main"].with_attr("global_symbol", symbol)  # the TIR nvcc compiled
            sources[f"{symbol}.cu"] = compiled.source
            runnable[symbol] = _cubin_and_launch(compiled)
            kernels.append(ArtifactKernel(symbol, str(site.operator), names, config, compiled.as_dict()))
            chosen += [(s, symbol) for s in group]
    if not kernels:
        return None, left
    cuda = tvm.target.Target({"kind": "cuda", "arch": target.arch}, host={"kind": "llvm"})
    try:
        library = tvm.compile(tvm.IRModule(funcs), target=cuda)
    except Exception as e:
        raise OpticError(f"TVM could not build the CUDA library for {target.name}: {str(e).splitlines()[0]}") from None
    regions = [ir.subgraph_callable(gm, site.nodes, site.inputs)  # before any replacement renames their inputs
               for site, _ in chosen]
    replace_sites(gm, [(site, GPUKernel(symbol, region, site.op.const("weight"), site.op.const("bias"), site.in_shape,
                                        site.out_shape, ir.shape(site.last), str(site.operator), *runnable[symbol],
                                        arch=target.arch),
                        f"gpu_{symbol}_{site.op.node.name}") for (site, symbol), region in zip(chosen, regions, strict=True)],
                  "tvm_gpu")
    # the artifact's graph, checked here on CPU (each kernel runs PyTorch's ops for its layer on CPU tensors)
    with torch.no_grad():
        args, kwargs = program.example_args, program.example_kwargs
        check = compare(program.gm(*args, **kwargs), gm(*args, **kwargs), tolerance)
    if not check.ok:
        raise OpticError(f"the artifact's graph disagrees with the optimized model ({check}); please report it")
    from .cuda_toolchain import nvcc_version

    # the cubins depend on nvcc as much as the CUDA source depends on TVM: the manifest names both
    tools = dict(toolchain(), nvcc=nvcc_version())
    return GPUArtifact(target.name, target.arch, result, library, kernels, left, sources, tools,
                       time.perf_counter() - start), left
