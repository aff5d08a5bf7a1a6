"""The pass pipeline: run passes in order, check each one, roll back on failure, record.

After every pass: graph lint, a numerical check of the candidate against the original model on
the example inputs plus generated ones, roll back (keep the last good Program) when the check or
the pass itself fails, and a :class:`PassRecord` either way. Passes can be switched off by name
through ``disable=`` or the ``OPTIC_DISABLE`` environment variable (comma separated), so that a
wrong result can be bisected to one pass. After the last pass, :mod:`.final` checks the whole result
(never slower, the numerical check, the budget's held-out check).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..ir.program import Program
from ..ir.rewrite import RuleStats
from . import cost, registry
from .registry import Pass, proposes
from .report import PassRecord, Report
from .verify import compare, run_seeded

log = logging.getLogger("optic.pipeline")

ENV_DISABLE = "OPTIC_DISABLE"


@dataclass
class PassContext:
    """What passes may read: the target, options, and where they record matches and notes."""

    target: Any
    tolerance: float = 1e-4
    check_inputs: list[tuple[tuple, dict]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    measure: bool = True  # the target is this machine: passes may time candidates
    stats: RuleStats = field(default_factory=RuleStats)
    record: PassRecord | None = None
    on_pass: Callable[[PassRecord], None] | None = None  # progress: called after each pass
    # instruments (TVM's PassInstrument idea): objects with ``after_pass(record, before, after)``,
    # called after every pass, skipped ones included (then ``before is after``)
    instruments: list[Any] = field(default_factory=list)
    # lossy passes (only with budget=): the budget, the calibration split and the evaluator that
    # scores a candidate against the original; ``budget_left`` is what the passes so far left unspent
    budget: Any = None
    calibration: Any = None
    evaluator: Any = None
    budget_left: float = 0.0
    progress: Callable[[str, int, int], None] | None = None  # long work: (what, done, total)
    reference: list[Any] | None = None  # what exact passes are checked against (after lossy ones: their result)
    # set by tvm_kernels when it kept generated kernels: the program without them, which cpu_tactics
    # times too, so that backend="tvm" is never slower than PyTorch's own kernels on the whole model
    without_generated: Any = None
    # whether a lossy pass that will run comes after the current one: it needs to see the graph, so a
    # step may not make the graph opaque (the whole-graph compiled implementation waits for it)
    lossy_after: bool = False
    # whether the CPU step will compile the whole graph after the current budget stage (int8 kernels then
    # cost no dispatch of their own: their fixed cost is not what it is in the plain graph)
    compiled_after: bool = False
    # whether the CPU step will offer the graph with optic's generated int8 kernels (AMX) after the current
    # budget stage: int8 layers are then timed, all together, with those kernels
    generated_after: bool = False
    # the passes that will run after the current one (tvm_kernels leaves the whole-model choice to the CPU
    # step when that step follows: it times the model with and without the generated kernels)
    passes_after: list[Any] = field(default_factory=list)

    def note(self, text: str) -> None:
        if self.record is not None:
            self.record.notes.append(text)

    def option(self, name: str) -> Any:
        """The value of a declared option: the user's, else the declared default (the one source of
        defaults). Reading an option no pass declares is a bug in the pass (an error, never a silent
        default)."""
        known = registry.declared_options()
        if name not in known:
            raise KeyError(f"option {name!r} is read but declared by no pass (optic.pipeline.registry.Option)")
        return self.options[name] if name in self.options else known[name].default


def disabled_passes(disable: list[str] | tuple | str | None) -> set[str]:
    names = set()
    for spec in (disable, os.environ.get(ENV_DISABLE, "")):
        if isinstance(spec, str):
            names.update(s.strip() for s in spec.split(",") if s.strip())
        elif spec:
            names.update(spec)
    return names


def run(program: Program, passes: list[Pass], ctx: PassContext, report: Report,
        disable: set[str] | None = None, reference: list[Any] | None = None) -> Program:
    """Run ``passes`` over ``program``; return the last good Program. ``report`` gets one record a pass.

    ``reference``: the original model's outputs on ``ctx.check_inputs`` when the caller has them.
    Exact passes are checked against the reference under ``ctx.tolerance``. Lossy passes (``exact``
    False) run only with ``ctx.budget``: consecutive passes that propose actions (``candidates``)
    form one stage whose budget :func:`optic.budget.allocate` spends; a lossy pass that rewrites
    by itself (``run``) is checked on the held-out calibration split instead of the tolerance. After
    a lossy change, later exact passes are checked against the changed model's outputs; the final
    reference is left in ``ctx.reference``."""
    disable = disable or set()
    if reference is None:
        reference = [run_seeded(program.gm, a, k) for a, k in ctx.check_inputs]
    ctx.reference = reference
    # a step that compiles the whole graph but ran while a lossy pass was still to come (which needs to
    # see the graph): (the step, the program before it, its record), to run again if they all declined
    deferred: tuple[Pass, Program, PassRecord] | None = None
    i = 0
    while i < len(passes):
        p = passes[i]
        if proposes(p) and ctx.budget is not None and p.name not in disable and program.runner is None:
            stage = [p]
            while (i + len(stage) < len(passes) and proposes(passes[i + len(stage)])
                   and passes[i + len(stage)].name not in disable):
                stage.append(passes[i + len(stage)])
            before = program
            rest = [q for q in passes[i + len(stage):] if q.name not in disable]
            program = _run_stage(program, stage, ctx, report, rest)
            for rec in report.passes[-len(stage):]:
                for inst in ctx.instruments:
                    inst.after_pass(rec, before, program)
                if ctx.on_pass is not None:
                    ctx.on_pass(rec)
            i += len(stage)
            continue
        rec = PassRecord(p.name, bool(getattr(p, "exact", True)))
        report.passes.append(rec)
        before = program
        if p.name in disable:
            rec.skipped = f"disabled ({ENV_DISABLE} or disable=)"
        elif not rec.exact and ctx.budget is None:
            rec.skipped = "lossy: runs only with budget= and calibration="
        elif not rec.exact and ctx.budget.max_drop <= 0:
            rec.skipped = "lossy: the budget is 0"
        elif program.runner is not None:
            rec.skipped = "the graph already runs in segments (early exit); passes after it cannot rewrite it"
        else:
            ctx.lossy_after = ctx.budget is not None and ctx.budget.max_drop > 0 and any(
                not getattr(q, "exact", True) and q.name not in disable for q in passes[i + 1:])
            ctx.passes_after = [q for q in passes[i + 1:] if q.name not in disable]
            if ctx.lossy_after and getattr(p, "compiles_whole_graph", False):
                deferred = (p, program, rec, ctx.reference)
            program = _run_one(program, p, ctx, rec, ctx.reference)
        for inst in ctx.instruments:
            inst.after_pass(rec, before, program)
        if ctx.on_pass is not None:
            ctx.on_pass(rec)
        i += 1
    if deferred is not None:
        program = _run_deferred(program, deferred, ctx, report)
    return program


def _run_deferred(program: Program, deferred: tuple[Pass, Program, PassRecord, list[Any]], ctx: PassContext,
                  report: Report) -> Program:
    """The whole-graph step once more, after the lossy passes that had to see the graph (early exit): it
    had to keep the graph open for them, and now may compile it. It runs on the program it first saw, so
    its first choice is made again with the compiled graph offered; the first record stays in the report
    with a note.

    Where those passes left the graph unchanged, its result is kept. Where they changed it (exits
    inserted), the compiled graph without their changes and the program with them are timed against each
    other on held-out calibration samples (the exits' gain depends on the data), and the faster is kept:
    a whole-graph program can gain more than the exits do (the digits transformer at batch 1: the TVM
    program 0.14 ms against 0.27 ms with exits on the per-layer kernels). The later passes' records then
    say they were superseded."""
    p, before, first, reference = deferred
    after = report.passes[report.passes.index(first) + 1:]
    if first.rolled_back or first.skipped:
        return program
    changed = program.runner is not None or any(r.changed and not r.rolled_back for r in after)
    from ..backend import whole

    ctx.lossy_after = False
    if not whole.will_compile(ctx, [p]):  # it would choose among what it chose from before
        return program
    rec = PassRecord(p.name, bool(getattr(p, "exact", True)))
    report.passes.append(rec)
    names = ", ".join(r.name for r in after)
    later_reference = ctx.reference
    ctx.reference = reference
    again = _run_one(before, p, ctx, rec, reference)
    if changed and not rec.rolled_back:
        again = _faster_than_later(program, again, ctx, report, rec, after)
    if rec.rolled_back:  # not built, or slower than the later passes' result: that stays
        ctx.reference = later_reference
    else:
        first.notes.append(f"ran before {names}, which must see the graph; run again after them (the later "
                           "record)")
        rec.notes.append(f"run again after {names}: the whole graph may be compiled now")
    for inst in ctx.instruments:
        inst.after_pass(rec, program, again)
    if ctx.on_pass is not None:
        ctx.on_pass(rec)
    return again if not rec.rolled_back else program


def _faster_than_later(later: Program, compiled: Program, ctx: PassContext, report: Report, rec: PassRecord,
                       after: list[PassRecord]) -> Program:
    """The faster of ``later`` (what the lossy passes after the whole-graph step made) and ``compiled`` (the
    step's result without them), timed alternated on held-out calibration samples at the example's batch."""
    from .final import timing_inputs  # final imports this module: imported here, when it runs
    from .timing import compare_models, rotating

    inputs = timing_inputs(later, ctx)
    names = ", ".join(r.name for r in after)
    t = compare_models({"later": rotating(later, inputs), "compiled": rotating(compiled, inputs)},
                       float(ctx.option("final_measure_s")))
    rec.measured["against_later_ms"] = {names: round(t["later"].median * 1e3, 4),
                                        "compiled": round(t["compiled"].median * 1e3, 4)}
    if t["compiled"].median >= t["later"].median:
        rec.notes.append(f"the whole graph compiled without what {names} did measured {t['compiled']}, against "
                         f"{t['later']} with it: kept {names}'s result")
        rec.rolled_back, rec.reason = True, f"slower than {names}'s result ({t['compiled']} against {t['later']})"
        return later
    why = (f"superseded: the whole graph compiled without it measured faster ({t['compiled']} against "
           f"{t['later']} with it)")
    for r in after:
        if r.changed and not r.rolled_back:
            _rollback(r, why)
    if report.budget:
        for a in report.budget.get("actions", []):
            if a.get("pass") in {r.name for r in after} and a.get("status") == "kept":
                a["status"] = "superseded by the compiled graph"
    rec.notes.append(f"the whole graph compiled measured {t['compiled']} against {t['later']} with what {names} "
                     "did: kept the compiled graph")
    return compiled


def _run_stage(program: Program, stage: list[Pass], ctx: PassContext, report: Report,
               rest: list[Pass] = ()) -> Program:
    """One budget stage: every pass proposes actions, the allocator chooses across all of them.

    When lossy passes follow (early exit), the stage may spend only ``budget_stage_share`` (default
    half) of what is left, so that they are not starved by small per-layer gains."""
    from ..budget.allocator import allocate

    recs = []
    for p in stage:
        rec = PassRecord(p.name, False)
        report.passes.append(rec)
        recs.append(rec)
    if ctx.budget.max_drop <= 0:
        for rec in recs:
            rec.skipped = "lossy: the budget is 0"
        return program
    t0 = time.perf_counter()
    from ..backend import whole

    ctx.compiled_after = whole.will_compile(ctx, list(rest))
    ctx.generated_after = not ctx.compiled_after and whole.will_generate(ctx, list(rest))
    actions, by_pass = [], {}
    for p, rec in zip(stage, recs, strict=True):
        ctx.stats, ctx.record = RuleStats(), rec
        rec.nodes_before, rec.params_before = program.node_count(), program.param_count()
        rec.flops_before = float(cost.total_flops(program))
        try:
            proposed = list(p.candidates(program, ctx))
        except Exception as e:
            log.debug("pass %s crashed proposing:\n%s", p.name, traceback.format_exc())
            _rollback(rec, f"pass raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            proposed = []
        rec.declined = [{"rule": r, "node": n, "reason": why} for r, n, why in ctx.stats.declined]
        by_pass[p.name] = proposed
        actions += proposed
    ctx.record = None
    # the allocator's drops are against the original model, so what earlier stages spent counts in them
    spent = max(0.0, ctx.budget.max_drop - ctx.budget_left)
    later = any(not getattr(q, "exact", True) for q in rest)  # lossy passes follow (early exit)
    allowed = spent + ctx.budget_left * (float(ctx.option("budget_stage_share")) if later else 1.0)
    compiled = (whole.compiled_call if ctx.compiled_after
                else whole.generated_call if ctx.generated_after else None)
    alloc = allocate(program, actions, ctx.evaluator, allowed, measure=ctx.measure,
                     measure_s=float(ctx.option("budget_measure_s")), progress=ctx.progress, compiled=compiled)
    seconds = (time.perf_counter() - t0) / max(len(stage), 1)
    result = alloc.program
    for p, rec in zip(stage, recs, strict=True):
        mine = by_pass[p.name]
        kept = [a for a in mine if a in alloc.kept]
        rec.changed = bool(kept)
        rec.matched = {f"{p.name} actions kept": len(kept)} if kept else {}
        rec.measured["actions"] = [a.row() for a in mine]
        rec.measured["proposed"] = len(mine)
        rec.seconds = seconds
        rec.nodes_after, rec.params_after = result.node_count(), result.param_count()
        rec.flops_after = float(cost.total_flops(result))
        if kept:
            gain = sum(a.predicted_gain_s for a in kept)
            rec.notes.append(f"kept {len(kept)} of {len(mine)} proposed actions; predicted gain on the target "
                             f"{gain * 1e6:.1f} µs")
    earlier = report.budget or {}  # an earlier stage's: its actions stay in the table
    report.budget = {
        "max_drop": ctx.budget.max_drop, "metric": ctx.evaluator.metric_name,
        "fit_samples": ctx.calibration.sizes[0], "holdout_samples": ctx.calibration.sizes[1],
        "base_fit": ctx.evaluator.base["fit"], "base_holdout": ctx.evaluator.base["holdout"],
        # drops are against the original model: a later stage's include what earlier ones spent
        "fit_drop": alloc.fit_drop if alloc.kept else earlier.get("fit_drop", 0.0),
        "holdout_drop": alloc.holdout_drop if alloc.kept else earlier.get("holdout_drop", 0.0),
        "evaluations": alloc.evaluations,
        "notes": earlier.get("notes", []) + alloc.notes, "actions": earlier.get("actions", []) + alloc.rows}
    if alloc.kept:
        ctx.budget_left = max(0.0, ctx.budget.max_drop - max(alloc.fit_drop, alloc.holdout_drop))
        ctx.reference = [run_seeded(result, a, k) for a, k in ctx.check_inputs]
        _widen_for_rounding(result, ctx, report)
    return result


class _Nudged(TorchDispatchMode):
    """Every op's floating-point result moved by float rounding (1e-5 of the tensor's mean magnitude, a few
    float32 ulps of a sum of its terms; seeded), as another exact arrangement of the same float work (a
    fused kernel, reassociated sums) would round it; results that are integer-valued throughout (a
    rounding step's) are left as they are."""

    relative = 1e-5

    def __init__(self, seed: int):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        return pytree.tree_map(self._nudge, out)

    def _nudge(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
            return t
        if torch.equal(t, t.round()):
            return t
        # a reassociated sum errs relative to the size of its terms, not of its result: the nudge is
        # scaled by the tensor's mean magnitude (a value near zero moves as much as the others)
        noise = torch.randn(t.shape, generator=self.g, dtype=t.dtype).to(t.device)
        return t + (self.relative * t.abs().mean()) * noise


def _widen_for_rounding(program: Program, ctx: PassContext, report: Report, draws: int = 3) -> None:
    """After a lossy change that rounds values to integers (int8), an exact rewrite upstream of a
    rounding (reassociated float sums, a fused kernel) can move a value across a rounding boundary: one
    quantization step, not float rounding. How far that moves the outputs is measured here, by running
    the changed model with every floating-point result moved by float rounding (:class:`_Nudged`:
    this reaches models whose inputs are integers, token ids, too), and later exact steps are checked
    against the changed model with that much slack (twice the worst seen) when it exceeds the
    tolerance; the report says so. The budget's final held-out check still guards the whole."""
    from ..backend import int8

    if ctx.tolerance == float("inf") or not ctx.check_inputs or not int8.rounds(program.gm):
        return  # float-only changes (low rank, pruning) keep the tolerance: their exact steps are checked as usual
    worst = 0.0
    for ref, (args, kwargs) in zip(ctx.reference, ctx.check_inputs, strict=True):
        for draw in range(draws):
            with _Nudged(draw):
                got = run_seeded(program, args, kwargs)
            worst = max(worst, compare(ref, got, float("inf")).rel)
    if 2 * worst > ctx.tolerance:
        ctx.tolerance = 2 * worst
        report.notes.append(f"the budgeted model rounds values to integers: float32 rounding moved anywhere in "
                            f"it moves its outputs by up to {worst:.1e}, so the steps after it are checked to "
                            f"{ctx.tolerance:.1e} against it (the budget's held-out check guards the result)")


def _run_one(program: Program, p: Pass, ctx: PassContext, rec: PassRecord, reference: list[Any]) -> Program:
    rec.nodes_before, rec.params_before = program.node_count(), program.param_count()
    rec.flops_before = float(cost.total_flops(program))
    candidate = program.clone()
    ctx.stats, ctx.record = RuleStats(), rec
    t0 = time.perf_counter()
    try:
        rec.changed = bool(p.run(candidate, ctx))
        if rec.changed and not rec.exact:
            candidate.recompile()
            drop = ctx.evaluator.drop(candidate, "holdout")
            rec.measured["holdout_drop"] = drop
            # the drop is against the original model: it includes what earlier lossy passes spent
            if drop > ctx.budget.max_drop + 1e-12:
                _rollback(rec, f"held-out {ctx.evaluator.metric_name} dropped {drop:.4f} against the original, "
                               f"over the budget {ctx.budget.max_drop}")
            else:
                ctx.budget_left = max(0.0, min(ctx.budget_left, ctx.budget.max_drop - drop))
                candidate.annotate_shapes()
                ctx.reference = [run_seeded(candidate, a, k) for a, k in ctx.check_inputs]
        elif rec.changed:
            candidate.recompile()
            got = [run_seeded(candidate, a, k) for a, k in ctx.check_inputs]
            worst = 0.0
            for ref, out in zip(reference, got, strict=True):
                c = compare(ref, out, ctx.tolerance)
                if not c.ok:
                    _rollback(rec, f"numerical check failed: {c}")
                    break
                worst = max(worst, c.rel)
            rec.max_error = worst
            if not rec.rolled_back:
                candidate.annotate_shapes()
    except Exception as e:  # a pass that crashes is rolled back, never half-applied
        log.debug("pass %s crashed:\n%s", p.name, traceback.format_exc())
        _rollback(rec, f"pass raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    rec.seconds = time.perf_counter() - t0
    rec.matched = dict(ctx.stats.matched)
    rec.declined = [{"rule": r, "node": n, "reason": why} for r, n, why in ctx.stats.declined]
    kept = program if rec.rolled_back or not rec.changed else candidate
    rec.nodes_after, rec.params_after = kept.node_count(), kept.param_count()
    rec.flops_after = float(cost.total_flops(kept))
    ctx.record = None
    return kept


def _rollback(rec: PassRecord, reason: str) -> None:
    rec.rolled_back = True
    rec.reason = reason
    log.info("pass %s rolled back: %s", rec.name, reason)
