"""``optic.optimize``: capture, run the verified pass pipeline, return a module with a report."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from . import cost, pipeline, registry
from .capture import capture as capture_program
from .errors import InputMismatchError, OpticError
from .program import Program
from .report import Report
from .timing import compare_models
from .verify import compare, generated_inputs, run_seeded, tolerance_for

log = logging.getLogger("optic")


class OptimizedModule(nn.Module):
    """The optimized model: same call signature as the original, plus ``report`` and ``program``.

    Graphs captured with torch.export are specialized to the example shapes: a call with other
    shapes raises :class:`InputMismatchError` instead of computing something wrong.
    """

    def __init__(self, program: Program, report: Report):
        super().__init__()
        self.graph_module = program.gm
        self.report = report
        self._program = program
        self._signature = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None
                           for t in program.flat_inputs()]

    @property
    def program(self) -> Program:
        return self._program

    def forward(self, *args, **kwargs):
        if self._program.capture == "export":
            self._check_inputs(args, kwargs)
        return self.graph_module(*args, **kwargs)

    def _check_inputs(self, args: tuple, kwargs: dict) -> None:
        leaves = pytree.tree_leaves((args, kwargs))
        got = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None for t in leaves]
        if got != self._signature:
            raise InputMismatchError(
                f"this module was captured with torch.export and is specialized to inputs "
                f"{_describe(self._signature)}; it was called with {_describe(got)}. Call optic.optimize again "
                "with example inputs of the shapes you will use (one optimized module per shape).")


def _final_check(reference: list, result: Program, checks: list, tol: float) -> float:
    worst = 0.0
    for ref, (args, kwargs) in zip(reference, checks, strict=True):
        worst = max(worst, compare(ref, run_seeded(result.gm, args, kwargs), tol).rel)
    return worst


def _never_slower(original: Program, result: Program, report: Report, budget_s: float) -> Program:
    """Time the captured and the optimized graph alternated in blocks; keep the optimized one
    unless it is slower beyond the measured noise (then the captured graph is returned, and the
    report says so)."""
    args, kwargs = original.example_args, original.example_kwargs
    t = compare_models({"original": lambda: original.gm(*args, **kwargs),
                        "optimized": lambda: result.gm(*args, **kwargs)}, budget_s)
    before, after = t["original"], t["optimized"]
    report.measured_latency_s = (before.median, after.median)
    noise = max(before.spread, after.spread)
    if after.median > before.median * (1 + noise):
        report.notes.append(f"the optimized graph measured slower here ({before} → {after}); "
                            "returned the captured graph instead")
        report.measured_latency_s = (before.median, before.median)
        return original
    return result


def _describe(sig: list) -> str:
    return ", ".join("non-tensor" if s is None else f"{list(s[0])}:{str(s[1]).replace('torch.', '')}" for s in sig)


def optimize(model: nn.Module, example_inputs: Any, target: Any = "cpu", passes: str | list = "exact", *,
             tolerance: float | None = None, verify: bool = True, disable: list[str] | str | None = None,
             inference: bool = True, capture: str = "auto", example_kwargs: dict | None = None,
             check_inputs: int = 2, options: dict | None = None, measure: bool | None = None,
             on_pass: Callable | None = None, instruments: list | None = None) -> OptimizedModule:
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
    """
    from . import targets as _targets  # optic.targets, installed from targets/

    t_start = time.perf_counter()
    tgt = _targets.get(target)
    pass_list = registry.resolve(passes)
    program = capture_program(model, example_inputs, example_kwargs, method=capture, inference=inference)
    original = program.clone()
    checks = [(program.example_args, program.example_kwargs)]
    checks += generated_inputs(program.example_args, program.example_kwargs, check_inputs, seed=1) if verify else []
    reference = [run_seeded(program.gm, a, k) for a, k in checks]  # the original's outputs, computed once
    tol = tolerance_for(reference[0], tolerance)
    ctx = pipeline.PassContext(
        target=tgt, tolerance=tol if verify else float("inf"), check_inputs=checks, options=dict(options or {}),
        measure=(tgt.kind == "cpu" and tgt.name == "cpu") if measure is None else measure, on_pass=on_pass,
        instruments=list(instruments or []))
    report = Report(model=type(model).__name__, target=tgt.name, capture=program.capture,
                    notes=list(program.notes), tolerance=tol, checked_inputs=len(checks))
    report.nodes = (program.node_count(), 0)
    report.params = (program.param_count(), 0)
    report.flops = (float(cost.total_flops(program)), 0.0)
    disabled = pipeline.disabled_passes(disable)
    unknown = disabled - set(registry.names())
    if unknown:
        raise OpticError(f"cannot disable unknown pass(es) {sorted(unknown)}; passes are {registry.names()}")
    result = pipeline.run(program, pass_list, ctx, report, disabled, reference)
    if ctx.measure and any(rec.changed and not rec.rolled_back for rec in report.passes):
        result = _never_slower(original, result, report, float(ctx.option("final_measure_s", 2.0)))

    report.final_error = _final_check(reference, result, checks, tol)
    if verify and report.final_error > tol:  # each pass was checked; this guards the whole
        report.notes.append(f"the optimized graph disagrees with the original on the checked inputs "
                            f"(error {report.final_error:.2e} > {tol:g}); returned the captured graph. "
                            "Please report it; bisect with disable=[...] or OPTIC_DISABLE.")
        result = original
        report.final_error = _final_check(reference, result, checks, tol)
    report.nodes = (report.nodes[0], result.node_count())
    report.params = (report.params[0], result.param_count())
    report.flops = (report.flops[0], float(cost.total_flops(result)))
    if tgt.peak_flops("float32") and tgt.mem_bandwidth:
        report.latency_estimate_s = (cost.roofline_seconds(original, tgt), cost.roofline_seconds(result, tgt))
    report.seconds = time.perf_counter() - t_start
    return OptimizedModule(result, report)
