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
from .ir.program import Program
from .pipeline import cost, health, registry
from .pipeline.report import Report
from .pipeline.timing import compare_models, rotating
from .pipeline.verify import compare, generated_inputs, run_seeded, tolerance_for
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


def _final_check(reference: list, result: Program, checks: list, tol: float) -> float:
    """The worst error of ``result`` against ``reference`` on ``checks``: NaN when the reference holds no
    finite value to compare (0.0 would claim an agreement nothing measured; the health note says why)."""
    if all(health.finite_share(ref) == 0.0 for ref in reference):
        return float("nan")
    worst = 0.0
    for ref, (args, kwargs) in zip(reference, checks, strict=True):
        worst = max(worst, compare(ref, run_seeded(result, args, kwargs), tol).rel)
    return worst


def _never_slower(original: Program, result: Program, report: Report, budget_s: float,
                  inputs: list[tuple[tuple, dict]]) -> Program:
    """Time the captured and the optimized model alternated in blocks (each call on the next of
    ``inputs``, so data-dependent models such as early exit are timed on real data); keep the
    optimized one unless it is slower beyond the measured noise (then the captured graph is
    returned, and the report says so)."""
    t = compare_models({"original": rotating(original, inputs), "optimized": rotating(result, inputs)}, budget_s)
    before, after = t["original"], t["optimized"]
    report.record_measured_latency(before, after)
    noise = max(before.spread, after.spread)
    if after.median > before.median * (1 + noise):
        report.notes.append(f"the optimized graph measured slower here ({before} → {after}); "
                            "returned the captured graph instead")
        report.record_measured_latency(before, before)
        return original
    if before.noisy or after.noisy:
        report.notes.append(f"timing the whole model here was too noisy to compare ({before} → {after}): kept the "
                            "optimized graph, which is verified to compute the same; measure again on a quiet machine")
    return result


def _with_tvm_kernels(pass_list: list, tgt: Any) -> list:
    """The pass list with ``tvm_kernels`` before ``cpu_tactics`` (oneDNN takes the layers it leaves),
    else at the end (before ``early_exit``, which splits the graph)."""
    from optic.tvm_compat import require_tvm

    require_tvm()
    if tgt.kind == "gpu":
        return pass_list  # the kernels are generated after the passes, into an artifact (optic.backend.artifact)
    if tgt.name != "cpu":
        raise OpticError(f"backend='tvm' builds and measures CPU kernels on this machine, so a CPU target must be "
                         f"'cpu' (this CPU), not {tgt.name!r}; for a GPU target (a100, h100, ...) it writes an "
                         "artifact")
    names = [p.name for p in pass_list]
    if "tvm_kernels" in names:
        return pass_list
    tvm = registry.get("tvm_kernels")
    at = names.index("cpu_tactics") if "cpu_tactics" in names else (
        names.index("early_exit") if "early_exit" in names else len(names))
    return [*pass_list[:at], tvm, *pass_list[at:]]


def _check_tolerance(tolerance: Any) -> None:
    ok = tolerance is None or (isinstance(tolerance, int | float) and not isinstance(tolerance, bool)
                               and math.isfinite(tolerance) and tolerance >= 0)
    if not ok:
        raise OpticError(f"tolerance must be a finite number >= 0 (the largest error allowed, relative to the "
                         f"output scale, e.g. 1e-4), or None for the dtype's default; got {tolerance!r}")


def _example_batch(flat: list) -> int | None:
    sizes = [t.shape[0] for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0]
    return int(sizes[0]) if sizes else None


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
        target: a target name (``optic.targets.names()``) or a ``Target``.
        passes: a preset (``"exact"``), a pass name, or a list of pass names / pass objects.
        tolerance: max error relative to the output scale (default by dtype: 1e-4 for fp32).
        verify: check every pass numerically and roll back the ones that break the tolerance.
        disable: pass names to switch off (also ``OPTIC_DISABLE=name,name``).
        inference: optimize ``model.eval()`` semantics (default); False keeps training-mode modules.
        capture: ``"auto"`` (fx, then export), ``"fx"`` or ``"export"``.
        check_inputs: generated input sets checked besides the examples.
        options: pass options (e.g. ``{"tactics_budget_s": 5}``).
        measure: let passes time candidates here (default: when the target is this machine's CPU).
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
            ``optic.load_artifact``), and ``result`` itself runs the optimized graph in PyTorch.
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
    from . import targets as _targets  # optic.targets, installed from targets/

    t_start = time.perf_counter()
    _check_tolerance(tolerance)
    tgt = _targets.get(target)
    pass_list = registry.resolve(passes)
    options = registry.check_options(options)
    if backend == "tvm":
        pass_list = _with_tvm_kernels(pass_list, tgt)
        from optic.backend.generated import trials_for

        trials_for(tune)  # a bad effort level is an error before any work
        options.setdefault("tune", tune)
        options.setdefault("tuning_db", tuning_db)
    elif backend != "torch":
        raise OpticError(f"unknown backend {backend!r}; backends are 'torch' (PyTorch's kernels) and 'tvm' "
                         "(generated kernels where they are faster)")
    program = capture_program(model, example_inputs, example_kwargs, method=capture, inference=inference,
                              dynamic=dynamic)
    original = program.clone()
    checks = [(program.example_args, program.example_kwargs)]
    checks += generated_inputs(program.example_args, program.example_kwargs, check_inputs, seed=1) if verify else []
    checks += program.size_checks if verify else []
    reference = [run_seeded(program.gm, a, k) for a, k in checks]  # the original's outputs, computed once
    tol = tolerance_for(reference[0], tolerance)
    ctx = pipeline.PassContext(
        target=tgt, tolerance=tol if verify else float("inf"), check_inputs=checks, options=options,
        measure=(tgt.kind == "cpu" and tgt.name == "cpu") if measure is None else measure, on_pass=on_pass,
        instruments=list(instruments or []))
    ctx.progress = progress_callback(progress)
    report = Report(model=type(model).__name__, target=tgt.name, capture=program.capture,
                    notes=list(program.notes), tolerance=tol, checked_inputs=len(checks),
                    dynamic=program.dims.describe() if program.dims else "")
    report.notes += health.notes(program.gm, reference[0])  # NaN/Inf weights verify "exactly": say so
    report.nodes = (program.node_count(), 0)
    report.params = (program.param_count(), 0)
    report.flops = (float(cost.total_flops(program)), 0.0)
    if budget is not None:
        flat = program.flat_inputs()
        batch = _example_batch(flat)
        cal = split_calibration(calibration, budget, single_input=len(flat) == 1 and not program.example_kwargs,
                                batch_size=batch if program.static_batch else None)
        ctx.budget, ctx.calibration, ctx.budget_left = budget, cal, float(budget.max_drop)
        ctx.evaluator = Evaluator(budget, cal, original)
        report.notes += cal.notes
    elif calibration is not None:
        report.notes.append("calibration= was given without budget=: no lossy pass ran (pass optic.Budget(...) "
                            "to allow them)")
    disabled = pipeline.disabled_passes(disable)
    unknown = disabled - set(registry.names())
    if unknown:
        raise OpticError(f"cannot disable unknown pass(es) {sorted(unknown)}; passes are {registry.names()}")
    result = pipeline.run(program, pass_list, ctx, report, disabled, reference)
    lossy = ctx.reference is not reference  # a lossy pass changed what the model computes
    if ctx.measure and any(rec.changed and not rec.rolled_back for rec in report.passes):
        batch = _example_batch(original.flat_inputs())
        timed = ctx.calibration.holdout_like(batch, 16) if ctx.calibration is not None and batch else []
        result = _never_slower(original, result, report, float(ctx.option("final_measure_s", 2.0)),
                               timed or [(original.example_args, original.example_kwargs)])
        if result is original:
            lossy = False

    final_tol = max(tol, ctx.tolerance) if lossy else tol  # widened after int8 rounding (pipeline)
    report.final_error = _final_check(ctx.reference if lossy else reference, result, checks, final_tol)
    if verify and report.final_error > final_tol:  # each pass was checked; this guards the whole
        report.notes.append(f"the optimized graph disagrees with the original on the checked inputs "
                            f"(error {report.final_error:.2e} > {final_tol:g}); returned the captured graph. "
                            "Please report it; bisect with disable=[...] or OPTIC_DISABLE.")
        result, lossy = original, False
        report.final_error = _final_check(reference, result, checks, tol)
    if lossy:
        final_drop = ctx.evaluator.drop(result, "holdout")
        report.budget = dict(report.budget or {}, final_holdout_drop=final_drop,
                             final_holdout=ctx.evaluator.base["holdout"] - final_drop)
        if final_drop > budget.max_drop + 1e-12:  # the stages are checked; this guards the whole
            report.notes.append(f"the held-out drop {final_drop:.4f} exceeds the budget {budget.max_drop}; "
                                "returned the captured graph. Please report it.")
            result = original
            report.final_error = _final_check(reference, result, checks, tol)
        else:
            report.notes.append(f"lossy passes changed the results within the budget: held-out {ctx.evaluator.metric_name} "
                                f"{ctx.evaluator.base['holdout']:.4f} → {report.budget['final_holdout']:.4f}; the "
                                "max error above is against the budgeted model")
    report.nodes = (report.nodes[0], result.node_count())
    report.params = (report.params[0], result.param_count())
    report.flops = (report.flops[0], float(cost.total_flops(result)))
    if tgt.peak_flops("float32") and tgt.mem_bandwidth:
        report.latency_estimate_s = (cost.roofline_seconds(original, tgt), cost.roofline_seconds(result, tgt))
    artifact = None
    if backend == "tvm" and tgt.kind == "gpu":
        from .backend.artifact import build_gpu_artifact

        artifact, left = build_gpu_artifact(result, tgt, tol, ctx.progress)
        report.notes.append(artifact.summary() if artifact else
                            f"backend='tvm': no layer of this model gets a generated CUDA kernel for {tgt.name} "
                            "(dense linear layers do; convolutions stay with cuDNN): no artifact")
        report.notes += [f"stays with PyTorch: {why}" for why in left[:20]]
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
