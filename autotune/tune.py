"""Tuning one operator: solve the template's space, rank it by the cost model, measure the top
candidates, keep every result in the database.

    result = tune(Operator("matmul", (512, 512, 512)), "cpu", trials=32)
    result.config, result.seconds, result.gflops

The steps, as ConstrINT and Triton's ``prune_configs_by`` do them: the solver enumerates exactly
the valid configurations (so an invalid one is never built); the cost model ranks them all; the
``trials`` best (spread over the model's distinct predictions, see :func:`select`) are built,
checked against the reference and timed in a worker process (``measure.Runner``); each result is
committed to the database (``db.TuningDB``) before the next candidate starts. The fastest few
(an eighth of the trials, 3 to 8) are then re-timed alternated in one run (with PyTorch's call for the operator when a baseline is
asked for), and that run decides between them. The database is
consulted first: once a workload has ``trials`` records on this target and toolchain, tuning it
again measures nothing. Where nothing can be measured (a GPU target on this machine) the model's
best is the answer, marked as predicted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optic import targets
from optic.errors import OpticError
from optic.targets import Target
from optic.tvm_compat import require_tvm

from . import cost_model
from .db import TuningDB, best_record, target_fingerprint, tuning_key
from .measure import DEFAULT_BUILDER, Baseline, EvaluatorConfig, Measurement, Runner
from .operator import Operator
from .solver import solve
from .space import SpaceError
from .toolchain import toolchain

__all__ = ["Progress", "TuneResult", "select", "tune", "with_cores", "workload_key"]


INVALID = ("build_error", "run_error", "wrong", "crash")
REFINE_SHARE = 0.5  # of the trials (16 or more): spent near the best measured configuration
BUILD_BATCH = 8  # candidates built together (in parallel, nothing timed meanwhile) before they are timed
FINAL_BUDGET_S = 3.0  # the final round's timing (after a warm-up); its rounds stop early once it is spent
MAX_FINALISTS = 8  # the fastest measured candidates re-timed side by side at the end of a run  # a configuration that should not have been built
Progress = Callable[[int, int, float, Measurement], None]  # (done, total, best seconds so far, last result)


@dataclass
class TuneResult:
    """What a tuning run found and what it took."""

    operator: Operator
    target: str
    key: str
    db_path: str
    config: dict[str, int] | None
    seconds: float | None  # measured median per call (None when nothing was measured: see predicted)
    predicted_seconds: float | None  # the cost model's estimate for ``config``
    measured: bool  # False: the configuration is the cost model's choice, never run
    measurements: int  # candidates measured in this run (0 when the database had them)
    invalid: int  # candidates of this run that failed to build or run, crashed or computed wrong
    timeouts: int
    space_size: int
    valid: int
    records: int  # records of this workload in the database after the run
    rank_correlation: float | None  # Spearman, cost model vs measurements, over this workload's records
    solve_seconds: float
    tune_seconds: float
    baseline: Baseline | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)  # this run's failed candidates

    @property
    def gflops(self) -> float | None:
        return self.operator.flops / self.seconds / 1e9 if self.seconds else None

    @property
    def torch_seconds(self) -> float | None:
        return self.baseline.torch_seconds if self.baseline else None

    def summary(self) -> str:
        """The result as a few lines of text (what ``optic kernel`` prints)."""
        flops = self.operator.flops
        cfg = " ".join(f"{k}={v}" for k, v in (self.config or {}).items())
        pred = self.predicted_seconds
        lines = [f"{self.operator} on {self.target}",
                 f"  space:    {self.space_size:,} configurations, {self.valid:,} valid "
                 f"(solved and ranked in {self.solve_seconds:.2f} s)"]
        if self.measured:
            rho = "n/a" if self.rank_correlation is None else f"{self.rank_correlation:+.2f}"
            cached = " (the database had them)" if self.measurements == 0 else ""
            lines.append(f"  measured: {self.measurements} in this run{cached}, {self.records} record(s) in all; "
                         f"{self.invalid} invalid, {self.timeouts} timed out; cost-model rank correlation {rho}")
            lines.append(f"  config:   {cfg}")
            lines.append(f"  time:     {self.seconds * 1e3:.4f} ms, {self.gflops:.1f} GFLOP/s "
                         f"(cost model: {pred * 1e3:.4f} ms, {flops / pred / 1e9:.1f} GFLOP/s)")
        else:
            lines.append("  measured: nothing (no device for this target here): the cost model's choice")
            lines.append(f"  config:   {cfg}")
            lines.append(f"  time:     predicted {pred * 1e3:.4f} ms, {flops / pred / 1e9:.1f} GFLOP/s")
        b = self.baseline
        if b is not None:
            lines.append(f"  torch:    {b.torch_seconds * 1e3:.4f} ms ({flops / b.torch_seconds / 1e9:.1f} GFLOP/s) vs "
                         f"this kernel {b.kernel_seconds * 1e3:.4f} ms ({flops / b.kernel_seconds / 1e9:.1f} GFLOP/s): "
                         f"{b.speedup:.2f}x, alternated in one run, {b.threads} thread(s), medians "
                         f"(spread ±{b.torch_spread * 50:.0f}% / ±{b.kernel_spread * 50:.0f}%)")
        lines.append(f"  tuning:   {self.tune_seconds:.1f} s; database {self.db_path}")
        for f in self.failures[:5]:
            lines.append(f"  failed:   {f['config']}: {f['status']}: {(f['error'] or '').splitlines()[0][:160]}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        b = self.baseline
        return {
            "operator": str(self.operator), "op": self.operator.as_dict(), "target": self.target, "key": self.key,
            "db": self.db_path, "config": self.config, "seconds": self.seconds, "gflops": self.gflops,
            "measured": self.measured, "predicted_seconds": self.predicted_seconds,
            "predicted_gflops": (self.operator.flops / self.predicted_seconds / 1e9
                                 if self.predicted_seconds else None),
            "measurements": self.measurements, "invalid": self.invalid, "timeouts": self.timeouts,
            "space_size": self.space_size, "valid": self.valid, "records": self.records,
            "rank_correlation": self.rank_correlation, "solve_seconds": self.solve_seconds,
            "tune_seconds": self.tune_seconds, "flops": self.operator.flops,
            "baseline": None if b is None else {
                "kernel_seconds": b.kernel_seconds, "torch_seconds": b.torch_seconds,
                "kernel_gflops": self.operator.flops / b.kernel_seconds / 1e9,
                "torch_gflops": self.operator.flops / b.torch_seconds / 1e9, "speedup": b.speedup,
                "threads": b.threads, "kernel_spread": b.kernel_spread, "torch_spread": b.torch_spread},
            "torch_seconds": self.torch_seconds,
            "failures": self.failures,
        }


def select(predicted: np.ndarray, order: np.ndarray, k: int, per_level: int | None = None) -> list[int]:
    """``k`` row indices to measure, best predictions first, at most ``per_level`` (default ``max(2, k//8)``)
    from one level of prediction (predictions within 1% of each other), spread evenly over the rows
    of that level; when the levels run out first, the rest in the model's order. A model that cannot
    tell configurations apart should not spend every trial on one of its ties; which of the tied
    rows are taken depends only on the rows (deterministic)."""
    if k <= 0 or len(order) == 0:
        return []
    per_level = per_level or max(2, k // 8)
    levels = np.floor(np.log(np.maximum(predicted[order], 1e-12)) / math.log(1.01)).astype(np.int64)
    chosen: list[int] = []
    start = 0
    while start < len(order) and len(chosen) < k:
        end = start
        while end < len(order) and levels[end] == levels[start]:
            end += 1
        members = order[start:end]
        take = min(per_level, len(members), k - len(chosen))
        picks = np.linspace(0, len(members) - 1, take).round().astype(int) if take > 1 else np.array([0])
        chosen += [int(members[i]) for i in dict.fromkeys(picks.tolist())]
        start = end
    if len(chosen) < k:  # fewer levels than trials: the rest in the model's order
        taken = set(chosen)
        chosen += [int(i) for i in order if int(i) not in taken][: k - len(chosen)]
    return chosen[:k]


def with_cores(t: Target, cores: int) -> Target:
    """``t`` (a CPU) restricted to ``cores`` cores, one thread each: the figures that scale with the cores
    (peak throughput, the memory-bandwidth estimate) scaled with them. Its fingerprint, and so its
    tuning records, differ from the whole CPU's."""
    if cores < 1:
        raise OpticError(f"threads must be 1 or more, not {cores}")
    scale = cores / (t.cores or 1)

    def scaled(x: float | None) -> float | None:
        return None if x is None else x * scale

    return dataclasses.replace(
        t, cores=cores, threads=cores, description=f"{t.description}; restricted to {cores} thread(s)",
        peak_fp32_flops=scaled(t.peak_fp32_flops), peak_fp16_flops=scaled(t.peak_fp16_flops),
        peak_bf16_flops=scaled(t.peak_bf16_flops), peak_int8_ops=scaled(t.peak_int8_ops),
        mem_bandwidth=scaled(t.mem_bandwidth) if scale < 1 else t.mem_bandwidth)


def _open_db(db: TuningDB | str | os.PathLike[str] | None) -> tuple[TuningDB, bool]:
    if isinstance(db, TuningDB):
        return db, False
    return TuningDB(db), True


def tune(operator: Operator, target: str | Target = "cpu", trials: int = 32, *,
         db: TuningDB | str | os.PathLike[str] | None = None, runner: Runner | None = None,
         rpc: tuple[str, int, str] | None = None, evaluator: EvaluatorConfig | None = None,
         builder: str = DEFAULT_BUILDER, threads: int | None = None, baseline: bool = False,
         progress: Progress | None = None) -> TuneResult:
    """Tune ``operator`` on ``target`` with at most ``trials`` measurements (see the module docstring).

    ``db``: a TuningDB, a path, or None for the default file. ``runner``: a started or new
    :class:`Runner` to measure with (else one is made, with ``rpc``, ``evaluator``, ``builder`` and
    ``threads``, and closed at the end). ``baseline``: also time PyTorch's call for the operator
    alternated with the chosen kernel in one run. ``progress(done, total, best_seconds, last)`` is
    called after each measurement.
    """
    start = time.perf_counter()
    t = targets.get(target)
    if trials < 0:
        raise OpticError(f"trials must be 0 or more, not {trials}")
    rpc = rpc or (runner.rpc if runner is not None else None)
    if t.kind != "cpu" and rpc:
        raise OpticError(f"measuring on {t.name} through --rpc is not supported yet (the RPC path sends CPU "
                         "libraries); without --rpc the cost model ranks the configurations")
    if threads and t.kind == "cpu" and threads != t.cores:
        t = with_cores(t, threads)
    early = None
    if runner is None and t.kind == "cpu" and (trials or baseline):
        early = Runner(evaluator, rpc=rpc, builder=builder, threads=threads)
        early.spawn()  # the worker imports torch and TVM (seconds) while the space is solved and ranked
    try:
        return _tune(operator, t, trials, db, runner or early, rpc, baseline, progress, start)
    finally:
        if early is not None:
            early.close()


def workload_key(operator: Operator, target: str | Target = "cpu", rpc: tuple[str, int, str] | None = None) -> str:
    """The database key ``tune`` files ``operator``'s records under on ``target`` (and the RPC device)."""
    return _key_parts(operator, target, rpc)[0]


def _key_parts(operator: Operator, target: str | Target, rpc: tuple[str, int, str] | None) -> tuple[str, dict, dict]:
    """``(key, target fingerprint, toolchain)``: the key and what it hashes, which the database also records."""
    fingerprint = target_fingerprint(targets.get(target), f"rpc:{rpc[2]}" if rpc else None)
    tools = toolchain()
    return tuning_key(operator.as_dict(), fingerprint, tools), fingerprint, tools


def _tune(operator: Operator, t: Target, trials: int, db: Any, runner: Runner | None,
          rpc: tuple[str, int, str] | None, baseline: bool, progress: Progress | None, start: float) -> TuneResult:
    space = operator.space(t)
    solved = solve(space)
    if solved.valid == 0:
        raise SpaceError(f"{operator} on {t.name}: no configuration of {space.name} satisfies its constraints "
                         f"(the template cannot cover these sizes)")
    names = solved.names
    order, predicted = cost_model.rank(space, names, solved.rows, t)
    solve_s = time.perf_counter() - start
    measurable = t.kind == "cpu"  # code generation is for CPUs (LLVM); GPUs are ranked by the model
    key, fingerprint, tools = _key_parts(operator, t, rpc)
    measured: list[Measurement] = []
    records: list[Any] = []
    base = None
    database, own_db = _open_db(db)
    try:
        if measurable:
            known = database.records(key)
            existing = {tuple(r.config.get(n) for n in names) for r in known}
            best = min((r.seconds for r in known), default=math.inf)
            todo = [] if len(existing) >= trials else [
                i for i in select(predicted, order, trials) if tuple(solved.rows[i]) not in existing]
            todo = todo[: trials - len(existing)] if todo else []
            if todo:
                require_tvm()  # every candidate is built with TVM: without it, say how to install it
                runner.ensure_started()  # an unreachable RPC device is an error before anything is recorded
                database.register(key, operator.as_dict(), str(operator), fingerprint, tools, operator.flops)
            total = len(todo)
            # the model's picks first; then, with 16+ trials, half of them spent around the best measured
            # (configurations one variable away from it, in the model's order): the model ranks the good
            # micro-kernels only roughly, the measurements tell which one this machine prefers
            explore = todo[: max(total - int(total * REFINE_SHARE), 1)] if total >= 16 else todo
            tried = set(existing)
            for phase in range(2):
                batch = explore if phase == 0 else _neighbours(solved, names, predicted, order, known + measured,
                                                               tried, total - len(measured), todo)
                for n, i in enumerate(batch):
                    config = dict(zip(names, solved.rows[i], strict=True))
                    tried.add(tuple(solved.rows[i]))
                    if n % BUILD_BATCH == 0:  # the next few built together on every core, then timed one by one
                        runner.prebuild(operator, [dict(zip(names, solved.rows[j], strict=True))
                                                   for j in batch[n:n + BUILD_BATCH]])
                    m = runner.measure(operator, config, best_seconds=best)
                    database.add(key, config, m.seconds, m.status, error=m.error, predicted=float(predicted[i]),
                                 build_seconds=m.build_seconds, samples=m.samples)
                    measured.append(m)
                    best = min(best, m.seconds)
                    if progress is not None:
                        progress(len(measured), total, best, m)
            records = database.records(key)
            # a final round pays for itself only when there is something to choose between (8+ trials);
            # with fewer, the best measured is the answer (optimize times it in the model anyway)
            finalists = [r for r in records if r.ok][: _finalists(trials) if todo and trials >= 8 else 1]
            if len(finalists) > 1 or (baseline and finalists):
                base = _final_round(runner, database, key, operator, finalists, baseline)
                records = database.records(key)
    finally:
        if own_db:
            database.close()
    chosen = best_record(records)
    if chosen is not None:
        config, seconds = {n: chosen.config[n] for n in names}, chosen.seconds
    else:  # nothing measured (or nothing worked): the model's choice
        config, seconds = dict(zip(names, solved.rows[int(order[0])], strict=True)), None
    return TuneResult(
        operator=operator, target=t.name, key=key, db_path=str(database.path), config=config, seconds=seconds,
        predicted_seconds=cost_model.predict(space, config, t).seconds, measured=seconds is not None,
        measurements=len(measured), invalid=sum(m.status in INVALID for m in measured),
        timeouts=sum(m.status == "timeout" for m in measured), space_size=solved.space_size, valid=solved.valid,
        records=len(records), rank_correlation=_correlation(space, t, names, records), solve_seconds=solve_s,
        tune_seconds=time.perf_counter() - start, baseline=base,
        failures=[{"config": m.config, "status": m.status, "error": m.error} for m in measured if not m.ok])


def _neighbours(solved: Any, names: Sequence[str], predicted: np.ndarray, order: np.ndarray, results: Sequence[Any],
                tried: set, k: int, planned: Sequence[int]) -> list[int]:
    """``k`` untried rows near the best measured configuration: one variable away first, then two, each in
    the model's order; the model's own picks (``planned``) fill what is left."""
    if k <= 0:
        return []
    ok = [r for r in results if getattr(r, "status", "ok") == "ok" and math.isfinite(r.seconds)]
    chosen: list[int] = []
    if ok:
        best = min(ok, key=lambda r: r.seconds).config
        rows = solved.array
        distance = (rows != np.asarray([best[n] for n in names], dtype=rows.dtype)).sum(axis=1)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        for d in (1, 2):
            near = np.flatnonzero(distance == d)
            for i in near[np.argsort(rank[near], kind="stable")]:
                if len(chosen) >= k:
                    return chosen
                if tuple(solved.rows[i]) not in tried:
                    chosen.append(int(i))
    for i in planned:
        if len(chosen) >= k:
            break
        if tuple(solved.rows[i]) not in tried and i not in chosen:
            chosen.append(int(i))
    return chosen


def _finalists(trials: int) -> int:
    """How many of the fastest candidates the final round rebuilds as deployed and re-times: an eighth of
    the trials, 3 to 8 (4 of 32: each one costs a full-optimization build and its share of the round)."""
    return max(3, min(MAX_FINALISTS, trials // 8))


def _final_round(runner: Runner, database: TuningDB, key: str, operator: Operator, finalists: list[Any],
                 baseline: bool) -> Baseline | None:
    """Re-time the finalists (and PyTorch's call) alternated in one run; their records take the
    re-timed medians. The best of many noisy measurements is the luckiest as often as the fastest;
    timed side by side, the finalists are compared under the same conditions."""
    final = runner.final(operator, [r.config for r in finalists], torch=baseline, budget_s=FINAL_BUDGET_S)
    if final is None:
        return None
    if finalists:  # the re-timed medians (as deployed, -O3) replace the search's
        now = time.time()
        for r, seconds in zip(finalists, final.kernel_seconds, strict=True):
            database.add(key, r.config, seconds, "ok", predicted=r.predicted, build_seconds=r.build_seconds,
                         final_round=now)
    best = min(range(len(finalists)), key=final.kernel_seconds.__getitem__)
    return final.baseline(best)


def _correlation(space: Any, t: Target, names: Sequence[str], records: Sequence[Any]) -> float | None:
    """Spearman's rank correlation of the current model's predictions with the measured times."""
    ok = [r for r in records if r.ok and all(n in r.config for n in names)]
    if len(ok) < 3:
        return None
    pred = cost_model.predict_rows(space, names, [tuple(r.config[n] for n in names) for r in ok], t)["seconds"]
    return cost_model.spearman(list(pred), [r.seconds for r in ok])
