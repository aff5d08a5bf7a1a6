"""The checks on the whole result, after the last pass: the pipeline checked every step; these guard the whole.

In order, each one able to hand back the captured graph instead of the optimized one (the report
says why):

1. never slower: where the target is this machine and a pass changed the graph, the captured and the
   optimized model are timed alternated in blocks; the optimized one is kept unless it measured slower
   beyond the noise;
2. the numerical check: the result against the original's outputs on every checked input (against the
   budgeted model's after a lossy pass, with the tolerance the pipeline widened for int8 rounding);
3. the held-out check (lossy passes only): the result's drop of the budget's metric on held-out
   calibration data, against the budget.
"""

from __future__ import annotations

from typing import Any

from ..ir.dynamic import batch_size
from ..ir.program import Program
from . import health
from .report import Report
from .runner import PassContext
from .timing import compare_models, rotating
from .verify import compare, run_seeded


def check_result(original: Program, result: Program, ctx: PassContext, report: Report, *,
                 checks: list[tuple[tuple, dict]], reference: list[Any], tolerance: float,
                 verify: bool = True) -> Program:
    """What :func:`optic.optimize` returns: ``result`` when it passes the three checks, else ``original``.

    ``checks`` and ``reference``: the inputs checked and the original's outputs on them, as handed to
    :func:`optic.pipeline.run`; ``tolerance``: the tolerance the passes were checked with (the numerical
    check applies it only when ``verify``; it measures ``report.final_error`` always)."""
    lossy = ctx.reference is not reference  # a lossy pass changed what the model computes
    if ctx.measure and any(rec.changed and not rec.rolled_back for rec in report.passes):
        result = never_slower(original, result, report, float(ctx.option("final_measure_s")),
                              timing_inputs(original, ctx))
        lossy = lossy and result is not original
    result, lossy = _numerics(original, result, ctx, report, checks, reference, tolerance, verify, lossy)
    if lossy:
        result = _holdout(original, result, ctx, report, checks, reference, tolerance)
    return result


def never_slower(original: Program, result: Program, report: Report, budget_s: float,
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


def final_error(reference: list[Any], result: Program, checks: list[tuple[tuple, dict]], tolerance: float) -> float:
    """The worst error of ``result`` against ``reference`` on ``checks``: NaN when the reference holds no
    finite value to compare (0.0 would claim an agreement nothing measured; the health note says why)."""
    if all(health.finite_share(ref) == 0.0 for ref in reference):
        return float("nan")
    worst = 0.0
    for ref, (args, kwargs) in zip(reference, checks, strict=True):
        worst = max(worst, compare(ref, run_seeded(result, args, kwargs), tolerance).rel)
    return worst


def timing_inputs(original: Program, ctx: PassContext) -> list[tuple[tuple, dict]]:
    """Held-out calibration samples at the example's batch where there are some (a data-dependent model
    is timed on real data), else the example."""
    batch = batch_size(original.flat_inputs())
    timed = ctx.calibration.holdout_like(batch, 16) if ctx.calibration is not None and batch else []
    return timed or [(original.example_args, original.example_kwargs)]


def _numerics(original: Program, result: Program, ctx: PassContext, report: Report, checks: list,
              reference: list[Any], tolerance: float, verify: bool, lossy: bool) -> tuple[Program, bool]:
    """``report.final_error`` of ``result``; the captured graph instead when it is over the tolerance."""
    tol = max(tolerance, ctx.tolerance) if lossy else tolerance  # widened after int8 rounding (pipeline)
    report.final_error = final_error(ctx.reference if lossy else reference, result, checks, tol)
    if verify and report.final_error > tol:  # each pass was checked; this guards the whole
        report.notes.append(f"the optimized graph disagrees with the original on the checked inputs "
                            f"(error {report.final_error:.2e} > {tol:g}); returned the captured graph. "
                            "Please report it; bisect with disable=[...] or OPTIC_DISABLE.")
        report.final_error = final_error(reference, original, checks, tolerance)
        return original, False
    return result, lossy


def _holdout(original: Program, result: Program, ctx: PassContext, report: Report, checks: list,
             reference: list[Any], tolerance: float) -> Program:
    """The budget's held-out check of the whole result; the captured graph instead when it is over budget."""
    drop = ctx.evaluator.drop(result, "holdout")
    report.budget = dict(report.budget or {}, final_holdout_drop=drop,
                         final_holdout=ctx.evaluator.base["holdout"] - drop)
    if drop > ctx.budget.max_drop + 1e-12:  # the stages are checked; this guards the whole
        report.notes.append(f"the held-out drop {drop:.4f} exceeds the budget {ctx.budget.max_drop}; "
                            "returned the captured graph. Please report it.")
        report.final_error = final_error(reference, original, checks, tolerance)
        return original
    report.notes.append(f"lossy passes changed the results within the budget: held-out {ctx.evaluator.metric_name} "
                        f"{ctx.evaluator.base['holdout']:.4f} → {report.budget['final_holdout']:.4f}; the "
                        "max error above is against the budgeted model")
    return result
