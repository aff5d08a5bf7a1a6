"""The pass pipeline: run passes in order, check each one, roll back on failure, record.

After every pass: graph lint, a numerical check of the candidate against the original model on
the example inputs plus generated ones, roll back (keep the last good Program) when the check or
the pass itself fails, and a :class:`PassRecord` either way. Passes can be switched off by name
through ``disable=`` or the ``OPTIC_DISABLE`` environment variable (comma separated), so that a
wrong result can be bisected to one pass.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import cost
from .program import Program
from .registry import Pass
from .report import PassRecord, Report
from .rewrite import RuleStats
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

    def note(self, text: str) -> None:
        if self.record is not None:
            self.record.notes.append(text)

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


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

    ``reference``: the original model's outputs on ``ctx.check_inputs`` when the caller has them."""
    disable = disable or set()
    if reference is None:
        reference = [run_seeded(program.gm, a, k) for a, k in ctx.check_inputs]
    for p in passes:
        rec = PassRecord(p.name, bool(getattr(p, "exact", True)))
        report.passes.append(rec)
        before = program
        if p.name in disable:
            rec.skipped = f"disabled ({ENV_DISABLE} or disable=)"
        else:
            program = _run_one(program, p, ctx, rec, reference)
        for inst in ctx.instruments:
            inst.after_pass(rec, before, program)
        if ctx.on_pass is not None:
            ctx.on_pass(rec)
    return program


def _run_one(program: Program, p: Pass, ctx: PassContext, rec: PassRecord, reference: list[Any]) -> Program:
    rec.nodes_before, rec.params_before = program.node_count(), program.param_count()
    rec.flops_before = float(cost.total_flops(program))
    candidate = program.clone()
    ctx.stats, ctx.record = RuleStats(), rec
    t0 = time.perf_counter()
    try:
        rec.changed = bool(p.run(candidate, ctx))
        if rec.changed:
            candidate.recompile()
            got = [run_seeded(candidate.gm, a, k) for a, k in ctx.check_inputs]
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
