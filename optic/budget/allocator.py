"""Spending an accuracy budget: lossy passes propose actions, one allocator chooses among them.

A lossy pass with ``candidates(program, ctx) -> list[Action]`` proposes per-layer actions (factor
this linear at rank 32, prune 25 % of this channel group, ...). Actions of one ``group`` are
alternative levels of the same change (at most one of them applies); actions of different groups
that rewrite the same nodes conflict (the first chosen wins), and so do actions of different
passes that change the same nodes at all (``touches``: pruning a channel group slices its
consumers, which low-rank factoring must then leave alone).

The allocator, greedy by marginal gain per unit of metric lost:

1. scores every action alone on the fit split (its *drop*) and takes its predicted latency gain
   from the target's cost model (``Action.predicted_gain_s``);
2. repeatedly takes, over all groups, the next level with the largest ``Δgain / Δdrop`` (free
   actions first; among equal ratios the one whose *risk* alone, the share of the fit samples' margins
   it used up, is smaller), rebuilds the program from the chosen actions and re-checks the whole on the
   fit split; a step that exceeds the budget is undone, and only milder levels of its group stay open;
3. on this machine (``ctx.measure``) times the model with and without each chosen action and
   drops the actions that are not faster here (a change that saves FLOPs but not time is undone);
   actions whose gain shows only where the backend compiles the whole graph (``compiled_gain``: int8
   layers) are timed all together through the compiled program instead, and kept or undone as one, and
   so are actions each too small for the model's timing noise (``measured_together``: bf16 layers on a
   CPU), in the plain graph where nothing compiles;
4. checks the held-out split and, while it is over budget, drops the chosen action with the worst
   gain per drop.

Every action ends in ``Allocation.rows`` with what was done, predicted and measured gain, the
drop alone and the cumulative drop, and why it was not kept when it was not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..ir.program import Program
from ..pipeline.timing import compare_models

log = logging.getLogger("optic.budget")


@dataclass
class Action:
    """One lossy change a pass proposes. ``apply`` rewrites a Program in place (finding its nodes
    by name; it must re-read weights from the Program it is given) and returns nothing."""

    pass_name: str
    group: str  # alternatives (levels) of one change share a group
    layer: str  # what a user recognises: the module path or node name
    describe: str  # e.g. "rank 32 of 256 (activation-aware SVD)"
    level: float  # orders the alternatives of a group (larger = more aggressive)
    nodes: frozenset[str]  # node names the action rewrites (conflict detection)
    predicted_gain_s: float  # latency saved on the target, by the target's cost model
    apply: Callable[[Program], None]
    predicted_only: bool = False  # the gain exists on the target only (e.g. 2:4 on a CPU): never measured here
    # the gain shows where the backend compiles the whole graph (int8 kernels fuse with their neighbours
    # there, and pay a dispatch each in the plain graph): such actions are measured together, compiled
    compiled_gain: bool = False
    # many layers each saving less than the timing noise of the whole model (bf16 on a CPU): timed all together
    # (with all of them against none of them, compiled where the backend compiles) and kept or undone as one
    measured_together: bool = False
    # nodes the action changes without owning them (pruning slices its consumers' inputs); they
    # conflict only with other passes' actions: a pass composes its own actions
    touches: frozenset[str] = frozenset()
    # filled by the allocator
    drop_alone: float | None = None
    risk_alone: float = 0.0  # how near it alone brought the fit samples to dropping more (Evaluator.assess)
    drop_cumulative: float | None = None
    measured_gain_s: float | None = None
    status: str = "candidate"  # kept | over budget | conflict | not faster here | held-out | not better
    info: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "layer": self.layer, "action": self.describe, "status": self.status,
                "predicted_gain_s": self.predicted_gain_s, "measured_gain_s": self.measured_gain_s,
                "predicted_only": self.predicted_only, "drop_alone": self.drop_alone,
                "drop_cumulative": self.drop_cumulative, "risk_alone": self.risk_alone, **self.info}


@dataclass
class Allocation:
    program: Program
    kept: list[Action]
    rows: list[dict[str, Any]]
    fit_drop: float
    holdout_drop: float
    evaluations: int
    notes: list[str] = field(default_factory=list)


def build(base: Program, actions: list[Action]) -> Program:
    prog = base.clone()
    for a in actions:
        a.apply(prog)
    prog.recompile()
    prog.annotate_shapes()
    return prog


def _assess(evaluator: Any, program: Program) -> tuple[float, float]:
    """``(drop, risk)`` on the fit split (an evaluator without ``assess``: the drop, no risk)."""
    assess = getattr(evaluator, "assess", None)
    if assess is None:
        return evaluator.drop(program, "fit"), 0.0
    return assess(program, "fit")


def _tie(ratio: float) -> float:
    """``ratio`` to 9 significant digits: equal gains computed along different roads compare equal."""
    return float(f"{ratio:.9g}")


def _conflicts(a: Action, chosen: dict[str, Action]) -> bool:
    for g, b in chosen.items():
        if g == a.group:
            continue
        if a.nodes & b.nodes:
            return True
        if a.pass_name != b.pass_name and (a.nodes | a.touches) & (b.nodes | b.touches):
            return True
    return False


def allocate(base: Program, actions: list[Action], evaluator: Any, max_drop: float, *, measure: bool = False,
             measure_s: float = 0.6, progress: Callable[[str, int, int], None] | None = None,
             compiled: Callable[[Program], Callable[[], Any]] | None = None) -> Allocation:
    """Choose which ``actions`` to apply to ``base`` within ``max_drop`` (see the module docstring).

    ``compiled``: when the backend will compile the whole graph (or run its own int8 kernels),
    ``compiled(program)`` is a zero-argument call of ``program`` built that way on its example (its
    attributes ``how`` and ``short`` name the way in notes and statuses); actions with ``compiled_gain`` are then measured
    together through it (with all of them against none of them) instead of one at a time in the plain
    graph, where their gain does not show."""
    notes: list[str] = []
    eps = 1e-9
    # what ``base`` itself lost against the original (an earlier budget stage): an action's own drop is above it
    base_drop = evaluator.drop(base, "fit") if actions else 0.0
    for i, a in enumerate(actions):  # 1. each action alone
        if progress:
            progress("scoring actions", i, len(actions))
        try:
            a.drop_alone, a.risk_alone = _assess(evaluator, build(base, [a]))
            a.drop_alone -= base_drop
        except Exception as e:  # an action that breaks the model is never chosen
            a.drop_alone, a.status = float("inf"), f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    groups: dict[str, list[Action]] = {}
    for a in actions:
        if a.drop_alone != float("inf") and a.predicted_gain_s > 0:
            groups.setdefault(a.group, []).append(a)
        elif a.status == "candidate":
            a.status = "no predicted gain on the target"
    for levels in groups.values():
        levels.sort(key=lambda a: a.level)

    chosen: dict[str, Action] = {}  # group -> level chosen
    closed: set[str] = set()
    ceiling: dict[str, float] = {}  # group -> the mildest level found over budget (milder ones may still fit)
    fit_drop = 0.0
    step = 0
    while True:  # 2. greedy by marginal gain per marginal drop
        best, best_key = None, None
        for g, levels in groups.items():
            if g in closed:
                continue
            cur = chosen.get(g)
            nxt = [a for a in levels if (cur is None or a.level > cur.level) and a.level < ceiling.get(g, float("inf"))]
            if not nxt:
                continue
            for a in nxt:  # the best ratio among this group's stronger levels
                d_gain = a.predicted_gain_s - (cur.predicted_gain_s if cur else 0.0)
                d_drop = max(a.drop_alone - (cur.drop_alone if cur else 0.0), 0.0)
                d_risk = a.risk_alone - (cur.risk_alone if cur else 0.0)
                if d_gain <= 0:
                    continue
                # Free steps go by gain. Ordering them by gain per risk (Evaluator.assess) kept 52 of ResNet-50's
                # 54 int8 layers instead of 49, but on the digits transformer it packed the fit split to the
                # edge of a flip: the held-out check undid 12 int8 layers in one run, and in another the test
                # set lost 1.25 points under a 1-point budget. The risk only breaks ties: layers of one shape
                # have the same predicted gain (ResNet-50's 1x1 convolutions: 25 of them), and among those the
                # one that used up less of the fit samples' margins goes first (graph order did before, and
                # left the margins to whichever came first).
                key = (d_drop <= eps, _tie(d_gain / max(d_drop, eps)), -d_risk)
                if best_key is None or key > best_key:
                    best, best_key = a, key
        if best is None:
            break
        step += 1
        if progress:
            progress("allocating budget", step, step + len(groups) - len(closed))
        if _conflicts(best, chosen):
            best.status = "conflict"
            closed.add(best.group)
            continue
        trial = dict(chosen)
        trial[best.group] = best
        try:
            drop = evaluator.drop(build(base, list(trial.values())), "fit")
        except Exception as e:
            best.status = f"failed with the others: {type(e).__name__}"
            closed.add(best.group)
            continue
        if drop > max_drop:
            best.status, best.drop_cumulative = "over budget", drop
            ceiling[best.group] = min(ceiling.get(best.group, float("inf")), best.level)
            continue
        prev = chosen.get(best.group)
        if prev is not None:
            prev.status = "superseded"
        chosen, fit_drop = trial, drop
        best.drop_cumulative = drop
        best.status = "kept"

    for a in actions:  # levels never tried: stronger than one found over budget, or never the best ratio
        if a.status == "candidate":
            over = a.level >= ceiling.get(a.group, float("inf"))
            a.status = "over budget (a milder level was)" if over else "not chosen"
    kept = list(chosen.values())
    if measure and kept:  # 3. a change that is not faster here is undone
        kept = _measured(base, kept, measure_s, progress, compiled, notes)
    # 4. the held-out check
    result = build(base, kept)
    holdout = evaluator.drop(result, "holdout") if kept else 0.0
    while kept and holdout > max_drop:
        worst = min(kept, key=lambda a: a.predicted_gain_s / max(a.drop_alone or 0.0, eps))
        worst.status = "dropped at the held-out check"
        kept = [a for a in kept if a is not worst]
        notes.append(f"held-out drop {holdout:.4f} > {max_drop}: undid {worst.pass_name} on {worst.layer}")
        result = build(base, kept)
        holdout = evaluator.drop(result, "holdout") if kept else 0.0
    if kept:
        fit_drop = evaluator.drop(result, "fit")
    else:
        fit_drop, result = 0.0, base
    rows = [a.row() for a in actions]
    return Allocation(result, kept, rows, fit_drop, holdout, evaluator.evaluations, notes)


def _measured(base: Program, kept: list[Action], budget_s: float,
              progress: Callable[[str, int, int], None] | None,
              compiled: Callable[[Program], Callable[[], Any]] | None = None,
              notes: list[str] | None = None) -> list[Action]:
    args, kwargs = base.example_args, base.example_kwargs
    together = [a for a in kept if not a.predicted_only and (a.measured_together or (a.compiled_gain and compiled))]
    out = [a for a in kept if a not in together]
    with_ = build(base, out)  # rebuilt only when an action is undone
    for i, a in enumerate(list(out)):
        if progress:
            progress("measuring kept actions", i, len(out))
        if a.predicted_only:
            continue
        without = build(base, [b for b in out if b is not a])
        t = compare_models({"without": lambda p=without: p(*args, **kwargs),
                            "with": lambda p=with_: p(*args, **kwargs)}, budget_s)
        a.measured_gain_s = t["without"].median - t["with"].median
        if a.measured_gain_s <= 0:
            a.status = "not faster here"
            out = [b for b in out if b is not a]
            with_ = without
    if together:  # through the compiled program where an action's gain shows only there, else the plain graph
        via = compiled if compiled is not None and any(a.compiled_gain for a in together) else _plain_call
        out += _measured_together(base, out, together, budget_s, progress, via, notes)
    return out


def _plain_call(program: Program) -> Callable[[], Any]:
    """A zero-argument call of ``program`` on its example, as it runs without the backend's compile."""
    args, kwargs = program.example_args, program.example_kwargs

    def call() -> Any:
        return program.gm(*args, **kwargs)
    return call


_plain_call.how, _plain_call.short = "in the plain graph", "plain graph"  # type: ignore[attr-defined]


def _measured_together(base: Program, others: list[Action], together: list[Action], budget_s: float,
                       progress: Callable[[str, int, int], None] | None,
                       compiled: Callable[[Program], Callable[[], Any]], notes: list[str] | None) -> list[Action]:
    """``together`` kept or undone as one, by timing the whole graph compiled with and without them (two
    compiles, where timing each alone would need one per action); their share of the measured gain is
    the share of their predicted gain."""
    if progress:
        progress("measuring compiled", 0, 2)
    without = compiled(build(base, others))
    if progress:
        progress("measuring compiled", 1, 2)
    with_ = compiled(build(base, others + together))
    for f in (without, with_):  # built (compiled) before the clock starts
        f()
    t = compare_models({"without": without, "with": with_}, budget_s * 2)
    gain = t["without"].median - t["with"].median
    total = sum(a.predicted_gain_s for a in together) or 1.0
    kinds = sorted({a.pass_name for a in together})
    how = getattr(compiled, "how", "with the whole graph compiled")
    what = f"{len(together)} {'/'.join(kinds)} actions measured together {how}"
    for a in together:
        a.measured_gain_s = gain * a.predicted_gain_s / total
    if notes is not None:
        notes.append(f"{what}: {t['without'].median * 1e3:.3f} → {t['with'].median * 1e3:.3f} ms "
                     f"({'kept' if gain > 0 else 'undone: not faster here'})")
    if gain > 0:
        return together
    for a in together:
        a.status = f"not faster here (measured together, {getattr(compiled, 'short', 'compiled')})"
    return []


def optimum(actions: list[Action], max_drop: float, max_groups: int = 16) -> tuple[float, list[Action]]:
    """The exact optimum of the allocation problem the greedy allocator approximates (HAWQ-V3's integer
    program): at most one level per group, no conflicting actions, the sum of the actions' own drops
    (``drop_alone``, scored already) within ``max_drop``, the largest predicted gain. By enumeration, so
    for small cases only (a test holds the greedy result against it)."""
    groups: dict[str, list[Action]] = {}
    for a in actions:
        if a.drop_alone is not None and a.drop_alone != float("inf") and a.predicted_gain_s > 0:
            groups.setdefault(a.group, []).append(a)
    if len(groups) > max_groups:
        raise ValueError(f"{len(groups)} groups: enumeration is for at most {max_groups}")
    names = list(groups)
    best: tuple[float, list[Action]] = (0.0, [])

    def visit(i: int, chosen: list[Action], gain: float, drop: float) -> None:
        nonlocal best
        if drop > max_drop + 1e-12:
            return
        if i == len(names):
            if gain > best[0]:
                best = (gain, list(chosen))
            return
        visit(i + 1, chosen, gain, drop)
        for a in groups[names[i]]:
            if not _conflicts(a, {b.group: b for b in chosen}):
                chosen.append(a)
                visit(i + 1, chosen, gain + a.predicted_gain_s, drop + max(a.drop_alone, 0.0))
                chosen.pop()

    visit(0, [], 0.0, 0.0)
    return best
