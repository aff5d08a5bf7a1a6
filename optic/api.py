"""``optic.optimize``: capture, run the verified pass pipeline, return a module with a report."""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from . import hf, pipeline
from .budget.calibration import Budget, Evaluator
from .budget.calibration import split as split_calibration
from .errors import OpticError
from .ir.capture import capture as capture_program
from .ir.contract import flatten
from .ir.dynamic import batch_size
from .ir.program import Program
from .pipeline import cost, health, registry
from .pipeline.final import check_result
from .pipeline.report import Report
from .pipeline.verify import generated_inputs, run_seeded, tolerance_for
from .progress import progress_callback

log = logging.getLogger("optic")


class OptimizedModule(nn.Module):
    """The optimized model: the original's call signature and output types, plus ``report`` and ``program``.

    A call is laid out as the example call was (:class:`optic.ir.contract.CallSignature`): an argument that
    was left out of the example, or a shape other than the example's on a graph captured with
    torch.export, raises :class:`InputMismatchError` instead of computing something wrong.
    """

    def __init__(self, program: Program, report: Report):
        super().__init__()
        self.graph_module = program.gm
        self.runner = program.runner  # early exit: runs the graph in segments, may return early
        self.report = report
        self._program = program
        if program.signature is not None and program.signature.sig is not None:
            self.__signature__ = program.signature.sig  # inspect.signature(result) reads as the original's
        # An inference result: its weights are folded, fused and packed, so there is nothing to train.
        # Outputs carry gradients only with respect to inputs, and only through differentiable kernels.
        for p in self.parameters():
            p.requires_grad_(False)
        self._fixed = _fixed_kernels(program.gm)

    @property
    def program(self) -> Program:
        return self._program

    def forward(self, *args, **kwargs):
        program = self._program
        if program.signature is not None:
            args, kwargs = program.signature.arrange(args, kwargs)
        if self._fixed and torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in flatten((args, kwargs))[0]):
            raise OpticError(
                f"this optimized module runs kernels without gradients ({_listed(self._fixed)}), so it cannot give "
                "a gradient with respect to its inputs. Call it under torch.no_grad() (or torch.inference_mode()), "
                "or optimize with disable=['cpu_tactics'] and backend='torch' for a module whose input gradients "
                "are exact.")
        out = (self.runner or self.graph_module)(*args, **kwargs)
        if program.out_structure is not None:  # the graph returned other containers than the model
            out = program.out_structure.rebuild(flatten(out)[0])
        return out

    def _apply(self, fn, recurse=True):
        """``.half()``, ``.double()``, ``.to(device)``: refused before anything changes when kernels built for
        float32 on this CPU would be handed other tensors."""
        if self._fixed:
            try:
                probe = fn(torch.zeros((), dtype=torch.float32))
            except Exception:  # not a tensor conversion we can probe: let nn.Module decide
                probe = None
            if isinstance(probe, torch.Tensor) and (probe.dtype != torch.float32 or probe.device.type != "cpu"):
                raise OpticError(
                    f"this optimized module runs kernels built for float32 on this CPU ({_listed(self._fixed)}); "
                    f"it cannot be converted to {probe.dtype} on {probe.device.type}. Optimize the converted model "
                    "instead (e.g. optic.optimize(model.half(), ...)), or optimize with disable=['cpu_tactics'] and "
                    "backend='torch' for a module that converts.")
        return super()._apply(fn, recurse)


def _fixed_kernels(gm: torch.fx.GraphModule) -> list[str]:
    """The ops of ``gm`` whose kernels are built for float32 on this CPU and have no autograd: oneDNN's
    pointwise kernels (pass cpu_tactics) and generated kernels (pass tvm_kernels)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target.namespace == "mkldnn":
            out.append(f"{node.target.name()} (cpu_tactics)")
        elif node.op == "call_module" and getattr(gm.get_submodule(node.target), "fixed_kernel", False):
            out.append("generated kernel (tvm_kernels)")
    return out


def _listed(names: list[str]) -> str:
    counts = collections.Counter(names)
    return ", ".join(f"{k} ×{v}" if v > 1 else k for k, v in counts.items())


def _checked_arguments(target: Any, passes: str | list, tolerance: Any, options: dict | None, disable: Any,
                       backend: str, tune: str | int, tuning_db: Any) -> tuple[Any, list, dict, set[str]]:
    """The target, the pass list (with the backend's steps), the options and the disabled passes; a bad
    argument is an :class:`OpticError` naming it, before any work."""
    from . import targets as _targets  # optic.targets, installed from targets/

    _check_tolerance(tolerance)
    tgt = _targets.get(target)
    pass_list = registry.resolve(passes)
    options = registry.check_options(options)
    if backend not in registry.BACKEND_STEPS:
        raise OpticError(f"unknown backend {backend!r}; backends are 'torch' (PyTorch's kernels) and 'tvm' "
                         "(generated kernels where they are faster)")
    if backend == "tvm":
        _check_tvm_backend(tgt, tune)
        options.setdefault("tune", tune)
        options.setdefault("tuning_db", tuning_db)
    pass_list = registry.with_backend(pass_list, backend, tgt.kind)
    disabled = pipeline.disabled_passes(disable)
    unknown = disabled - set(registry.names())
    if unknown:
        raise OpticError(f"cannot disable unknown pass(es) {sorted(unknown)}; passes are {registry.names()}")
    return tgt, pass_list, options, disabled


def _check_tvm_backend(tgt: Any, tune: str | int) -> None:
    """backend='tvm' needs TVM, a target it can serve and a tuning effort it knows."""
    from optic.tvm_compat import require_tvm

    require_tvm()
    if tgt.kind != "gpu" and tgt.name != "cpu":
        raise OpticError(f"backend='tvm' builds and measures CPU kernels on this machine, so a CPU target must be "
                         f"'cpu' (this CPU), not {tgt.name!r}; for a GPU target (a100, h100, ...) it writes an "
                         "artifact")
    from optic.backend.generated import trials_for

    trials_for(tune)  # a bad effort level is an error before any work


def _device_checked(model: nn.Module, example_inputs: Any, example_kwargs: dict | None,
                    tgt: Any) -> tuple[torch.device, list[str]]:
    """The device the model and its examples are on, and notes on it for the report; an :class:`OpticError`
    when they are on two devices, on one optic cannot run, or on a GPU while the target is a CPU."""
    from . import device
    from . import targets as _targets

    on = device.of((example_inputs, example_kwargs))
    if on.type not in ("cpu", "cuda"):
        raise OpticError(f"the example inputs are on {on}; optic optimizes models on the CPU or on a CUDA GPU (it runs "
                         "them to check every pass): move the model and its inputs to one of those")
    weights = device.of_module(model) if isinstance(model, nn.Module) else None  # not a module: capture says so
    if weights is not None and (weights.type, weights.index or 0) != (on.type, on.index or 0):
        raise OpticError(f"the model's weights are on {weights} and its example inputs on {on}: move both to one "
                         f"device (e.g. model.to(x.device))")
    if on.type == "cpu":
        notes = [f"the model is on the CPU: target '{tgt.name}' is planned (cost model, generated code), not "
                 "measured; move the model and its inputs to cuda to measure on this GPU"] \
            if tgt.kind == "gpu" and torch.cuda.is_available() else []
        return on, notes
    if tgt.kind != "gpu":
        raise OpticError(f"the model and its example inputs are on {on}, and target '{tgt.name}' is a CPU: use "
                         "target='cuda' (this GPU) or a GPU's name, or move the model and inputs to the CPU")
    props = torch.cuda.get_device_properties(on)
    notes = [f"runs on {on} ({props.name}, compute capability {props.major}.{props.minor}, "
             f"{props.multi_processor_count} SMs)"]
    if tgt.name != "cuda" and not _targets.cuda.same_board(tgt, props, _targets.table_for):
        notes.append(f"target '{tgt.name}' is not this GPU ({props.name}): the plan uses the {tgt.name}'s figures, "
                     f"and what is measured is measured on the {props.name}; target='cuda' plans for this GPU")
    return on, notes


def _check_tolerance(tolerance: Any) -> None:
    ok = tolerance is None or (isinstance(tolerance, int | float) and not isinstance(tolerance, bool)
                               and math.isfinite(tolerance) and tolerance >= 0)
    if not ok:
        raise OpticError(f"tolerance must be a finite number >= 0 (the largest error allowed, relative to the "
                         f"output scale, e.g. 1e-4), or None for the dtype's default; got {tolerance!r}")


def _checks_and_reference(program: Program, verify: bool, check_inputs: int,
                          tolerance: float | None) -> tuple[list, list, float]:
    """The input sets every pass is checked on (the example, generated ones, other sizes), the original's
    outputs on them (computed once) and the tolerance for its output dtype."""
    checks = [(program.example_args, program.example_kwargs)]
    if verify:
        checks += generated_inputs(program.example_args, program.example_kwargs, check_inputs, seed=1)
        checks += program.size_checks
    reference = [run_seeded(program.gm, a, k) for a, k in checks]
    return checks, reference, tolerance_for(reference[0], tolerance)


def _start_report(model: nn.Module, tgt: Any, program: Program, checks: list, reference: list, tol: float) -> Report:
    """The report with what is known before the passes: the captured graph's size, cost and health."""
    report = Report(model=type(model).__name__, target=tgt.name, capture=program.capture,
                    notes=list(program.notes), tolerance=tol, checked_inputs=len(checks),
                    dynamic=program.dims.describe() if program.dims else "")
    report.notes += health.notes(program.gm, reference[0])  # NaN/Inf weights verify "exactly": say so
    report.nodes = (program.node_count(), 0)
    report.params = (program.param_count(), 0)
    report.flops = (float(cost.total_flops(program)), 0.0)
    return report


def _context(program: Program, original: Program, tgt: Any, checks: list, tol: float, report: Report, *,
             verify: bool, options: dict, measure: bool | None, on_pass: Callable | None, instruments: list | None,
             progress: Any, budget: Budget | None, calibration: Any, on: torch.device) -> pipeline.PassContext:
    """The pass context: target, tolerance, checked inputs, options, instruments and, with a budget, the
    calibration split and the evaluator that scores candidates against ``original``."""
    ctx = pipeline.PassContext(
        target=tgt, tolerance=tol if verify else float("inf"), check_inputs=checks, options=options,
        measure=_measurable(tgt, on) if measure is None else measure, on_pass=on_pass,
        instruments=list(instruments or []))
    ctx.progress = progress_callback(progress)
    if budget is not None:
        flat = program.flat_inputs()
        cal = split_calibration(calibration, budget, single_input=len(flat) == 1 and not program.example_kwargs,
                                batch_size=batch_size(flat) if program.static_batch else None)
        ctx.budget, ctx.calibration, ctx.budget_left = budget, cal, float(budget.max_drop)
        ctx.evaluator = Evaluator(budget, cal, original)
        report.notes += cal.notes
    elif calibration is not None:
        report.notes.append("calibration= was given without budget=: no lossy pass ran (pass optic.Budget(...) "
                            "to allow them)")
    return ctx


def _measurable(tgt: Any, on: torch.device) -> bool:
    """Whether the target's hardware is where the model runs: this CPU with the model on it, or a GPU target
    with the model on a CUDA device (then timing is on the device)."""
    return (tgt.kind == "cpu" and tgt.name == "cpu" and on.type == "cpu") or (tgt.kind == "gpu" and on.type == "cuda")


def _finish_report(report: Report, original: Program, result: Program, tgt: Any) -> None:
    """The report's after-figures: nodes, parameters, FLOPs and the roofline estimate of both graphs."""
    report.nodes = (report.nodes[0], result.node_count())
    report.params = (report.params[0], result.param_count())
    report.flops = (report.flops[0], float(cost.total_flops(result)))
    if tgt.peak_flops("float32") and tgt.mem_bandwidth:
        report.latency_estimate_s = (cost.roofline_seconds(original, tgt), cost.roofline_seconds(result, tgt))


def _gpu_artifact(result: Program, tgt: Any, tol: float, ctx: pipeline.PassContext, report: Report) -> Any:
    """backend='tvm' on a GPU target: the generated CUDA kernels, as an artifact (None when no layer gets one)."""
    from .backend.artifact import build_gpu_artifact

    artifact, left = build_gpu_artifact(result, tgt, tol, ctx.progress)
    report.notes.append(artifact.summary() if artifact else
                        f"backend='tvm': no layer of this model gets a generated CUDA kernel for {tgt.name} "
                        "(dense linear layers do; convolutions stay with cuDNN): no artifact")
    report.notes += [f"stays with PyTorch: {why}" for why in left[:20]]
    return artifact


def optimize(model: nn.Module, example_inputs: Any, target: Any = "cpu", passes: str | list = "exact", *,
             tolerance: float | None = None, verify: bool = True, disable: list[str] | str | None = None,
             inference: bool = True, capture: str = "auto", example_kwargs: dict | None = None,
             check_inputs: int = 2, options: dict | None = None, measure: bool | None = None,
             on_pass: Callable | None = None, instruments: list | None = None, budget: Budget | None = None,
             calibration: Any = None, progress: bool | Callable[[str, int, int], None] | None = None,
             backend: str = "torch", tune: str | int = "fast", tuning_db: Any = None,
             dynamic: Any = "auto") -> OptimizedModule:
    """Optimize ``model`` for ``target``; the result computes the same function, checked on data.

    Args:
        model: the model; never modified (optic works on a deep copy).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        target: a target name (``optic.targets.names()``), ``"cuda"`` (the GPU this process sees, detected), or a
            ``Target``. A model and inputs on a CUDA device stay there: every pass, check and timing runs on it.
        passes: a preset (``"exact"``), a pass name, or a list of pass names / pass objects.
        tolerance: max error relative to the output scale (default by dtype: 1e-4 for fp32).
        verify: check every pass numerically and roll back the ones that break the tolerance.
        disable: pass names to switch off (also ``OPTIC_DISABLE=name,name``).
        inference: optimize ``model.eval()`` semantics (default); False keeps training-mode modules.
        capture: ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``.
        check_inputs: generated input sets checked besides the examples.
        options: pass options (e.g. ``{"tactics_budget_s": 5}``).
        measure: let passes time candidates here (default: when the target's hardware is where the model is:
            this machine's CPU, or a GPU target with the model and inputs on a CUDA device).
        on_pass: called with each PassRecord as the pipeline goes (progress).
        instruments: objects with ``after_pass(record, before, after)`` (Programs), e.g. dumps.
        budget: ``optic.Budget(max_drop=0.01, metric="top1")``: lets the lossy passes of the preset
            (``passes="default"``: low-rank, pruning, 2:4 sparsity, early exit) change the model's
            results by at most ``max_drop`` of the metric on held-out calibration data. Without it
            no lossy pass runs.
        calibration: the data the budget is measured on (required with ``budget``): an iterable of
            batches, each the model's inputs or an ``(inputs, labels)`` pair; see
            :mod:`optic.budget.calibration` for the rules and ``optic.Labeled`` for the explicit form.
        progress: long work (budget allocation, int8 calibration, training exit heads, tuning kernels)
            reports its progress: ``True`` draws tqdm bars on stderr when it is a terminal (nothing in a
            log or CI), a callable is called as ``progress(what, done, total)``; None (the default) draws
            nothing unless ``OPTIC_PROGRESS=1`` (library code prints only when asked; see
            :mod:`optic.progress`).
        backend: ``"torch"`` (PyTorch's kernels, the default) or ``"tvm"``: every dense conv/linear
            (with its bias, activation and residual add) also gets a kernel generated by TVM with
            tuned tile sizes, which replaces PyTorch's only where it is measured faster here
            (pass ``tvm_kernels``; this machine's CPU). For a GPU target, the CUDA kernels are generated
            (cost model's configuration, ptxas-checked) into ``result.artifact`` (``.save(path)``;
            ``optic.load_artifact``), and ``result`` runs them on CUDA tensors (PyTorch's ops on CPU ones,
            and where a kernel cannot run, with a note).
        tune: tuning effort with ``backend="tvm"``: ``"none"`` (no measurement: the tuning
            database's best, else the cost model's choice), ``"fast"`` (the cost model's 4 best per
            kernel, at most a minute of tuning), ``"full"`` (32), or a number of measurements per kernel.
            What the database holds is never measured again.
        tuning_db: the tuning database (a path or ``optic.autotune.TuningDB``); default
            ``$OPTIC_TUNING_DB`` or the user's cache directory.
        dynamic: which input sizes the result serves when the model is captured with torch.export (fx graphs
            take what the model's Python takes). ``"auto"``: any batch size (dimension 0 of the batched
            inputs) where export can keep it dynamic; a dict names more dimensions, e.g.
            ``{"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}`` (a name or a ``torch.export.Dim``;
            inputs that share a name share the size); ``False``: the example's shapes only. Every pass is
            also verified on an input of another size; the report says which dimensions are dynamic.
    """
    t_start = time.perf_counter()
    tgt, pass_list, options, disabled = _checked_arguments(target, passes, tolerance, options, disable, backend,
                                                           tune, tuning_db)
    on, device_notes = _device_checked(model, example_inputs, example_kwargs, tgt)
    program = capture_program(model, example_inputs, example_kwargs, method=capture, inference=inference,
                              dynamic=dynamic)
    original = program.clone()
    checks, reference, tol = _checks_and_reference(program, verify, check_inputs, tolerance)
    report = _start_report(model, tgt, program, checks, reference, tol)
    report.notes += device_notes
    ctx = _context(program, original, tgt, checks, tol, report, verify=verify, options=options, measure=measure,
                   on_pass=on_pass, instruments=instruments, progress=progress, budget=budget,
                   calibration=calibration, on=on)
    result = pipeline.run(program, pass_list, ctx, report, disabled, reference)
    result = check_result(original, result, ctx, report, checks=checks, reference=reference, tolerance=tol,
                          verify=verify)
    _finish_report(report, original, result, tgt)
    artifact = _gpu_artifact(result, tgt, tol, ctx, report) if backend == "tvm" and tgt.kind == "gpu" else None
    if artifact is not None and result.runner is None:
        # the generated kernels run inside the returned module (PyTorch's ops on CPU tensors, checked above)
        result = artifact.program
    report.seconds = time.perf_counter() - t_start
    out = OptimizedModule(result, report)
    out.artifact = artifact
    if hf.is_hf(model) and not hf.building_step():  # Hugging Face models stay Hugging Face models
        settings = dict(target=target, passes=passes if budget is None else "exact", tolerance=tolerance,
                        verify=verify, disable=disable, check_inputs=check_inputs, options=options, measure=measure,
                        backend=backend, tune=tune, tuning_db=tuning_db, capture="export")
        return _hf_result(model, out, program.example_args, program.example_kwargs, settings)
    return out


def _hf_result(model: nn.Module, main: OptimizedModule, args: tuple, kwargs: dict, settings: dict) -> nn.Module:
    """``main`` as an instance of the model's own class (optic.hf), with a generation graph for a model that
    generates, optimized with the same settings (exact passes only: the budget was measured on ``main``'s
    calls)."""
    step = None
    example = hf.step_example(model, args, kwargs) if hf.can_generate(model) else None
    if example is not None:
        with hf._building():
            try:
                step = optimize(model, (), example_kwargs=example[0], dynamic=example[1], **settings)
            except OpticError as e:
                main.report.notes.append(f"generation: no generation graph ({str(e).splitlines()[0]}); generate() "
                                         "is not available on the result")
    return hf.wrap(model, main, step)
