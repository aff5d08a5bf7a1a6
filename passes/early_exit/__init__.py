"""early_exit: return a classifier's answer from an early block when a small head is confident. Lossy.

For a model whose output is ``[N, K]`` logits, in four steps, one module each:

- **where** (``cuts``): block boundaries, stream nodes that dominate the output and are then the
  only value of the model's data flow live across the cut after them (side values such as attention
  masks cross too and are passed along). Up to ``exit_points`` cuts are chosen near ``i/(n+1)`` of
  the model's predicted cost on the target (``cost.node_seconds``); features must be 2-D/3-D/4-D float.
- **heads** (``heads``): ``ExitHead`` per cut (pool → [LayerNorm] → Linear), trained with the
  backbone frozen on the fit split by self-distillation from the model's own logits ``z``::

      L = Σ_heads T²·KL(softmax(z/T) ‖ softmax(h/T)) + CE(h, labels)   (T = exit_temperature; CE when labeled)

- **thresholds** (``thresholds``): a sample leaves at the first head whose max softmax probability
  reaches the head's threshold. Greedy over per-head threshold grids: each step takes the loosening
  with the largest predicted saving per unit of metric drop (``ctx.evaluator`` on the fit split) that
  keeps the drop and the share of changed predictions within ``exit_fit_share`` of ``ctx.budget_left``;
  heads that exit nobody are removed.
- **runner** (``runner``): ``Program.runner`` becomes an ``EarlyExitRunner``, checked for real on the
  fit split (the search's last settings are backed off while it spends more than allowed); ``gm`` is
  untouched.

Not exact: outputs of exited samples are the head's logits. Declines when there is no budget or
calibration, the output is not only ``[N, K]`` logits, a runner is already set, or no cut exists.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from optic.ir.graph import shape as shape_of
from optic.ir.rewrite import MODEL
from optic.pipeline.registry import Option, register
from optic.pipeline.timing import compare_models, rotating

from .cuts import RULE, Cut, choose_cuts, exit_candidates, segment_seconds
from .heads import ExitHead, FittedHeads, fit_heads, head_seconds
from .runner import EarlyExitRunner, classifier_output, make_runner, output_values
from .thresholds import Outcome, ThresholdSearch, executed_fraction


@register
class EarlyExit:
    name = "early_exit"
    exact = False
    description = "early exits at block boundaries: distilled heads, confidence thresholds within the budget"
    options = (
        Option("exit_points", int, 3, "the most exits inserted"),
        Option("exit_steps", int, 300, "training steps of each exit head (distilled from the final output)"),
        Option("exit_temperature", float, 2.0, "distillation temperature of the exit heads"),
        Option("exit_fit_share", float, 0.5, "share of the unspent budget the thresholds may use"),
        Option("exit_measure_s", float, 1.0, "seconds spent timing the model with exits against without"),
    )

    def run(self, program: Any, ctx: Any) -> bool:
        why = _guard(program, ctx)
        if why is not None:  # about the call or the program, not a node
            return _decline(ctx, MODEL, why)
        spec, why = classifier_output(program)
        if why is not None:
            return _decline(ctx, _output_node(program.gm).name, why)  # the value it returns is to blame
        cuts, why = _cuts(program, ctx)
        if why is not None:
            return _decline(ctx, MODEL, why)
        fitted = _fit_heads(program, cuts, ctx)
        search = _threshold_search(program, cuts, fitted, spec, ctx)
        found = _runner_within_budget(program, cuts, fitted.heads, search.search(ctx.progress), spec, ctx,
                                      search.base_drop, search.allowed)
        if found is None:
            return _no_exit(ctx, cuts, search.allowed)
        runner, res, keep, drop = found
        _count(ctx, cuts, keep)
        why = _probe_subbatch(program, runner, ctx)
        if why is not None:
            ctx.note(f"batching defeats exits for this graph ({why}): at batch > 1 every sample runs until all "
                     "of them have exited; exits pay at batch 1")
        measured = _report(program, ctx, runner, [cuts[k] for k in keep], res, drop, keep, search.head_costs)
        if measured.get("measured_speedup", 1.0) < 1.0:
            return _decline(ctx, MODEL, f"the exits measured slower at the example's batch of "
                                        f"{measured['measured_batch']} ({measured['measured_speedup']:.2f}× the "
                                        "speed without them); nothing changed")
        runner.reset_counts()
        program.runner = runner
        return True


# -- the steps ---------------------------------------------------------------------------------------
def _decline(ctx: Any, node: str, why: str) -> bool:
    ctx.stats.decline(RULE, node, why)
    ctx.note(why)
    return False


def _guard(program: Any, ctx: Any) -> str | None:
    if ctx.evaluator is None or ctx.calibration is None:
        return "needs budget= and calibration= data (a lossy pass)"
    if program.runner is not None:
        return "the program already runs through a runner"
    return None


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _nodes(gm: fx.GraphModule, names: list[str]) -> list[fx.Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    return [by_name[name] for name in names]


def _cuts(program: Any, ctx: Any) -> tuple[list[Cut], str | None]:
    """The cuts the exits go after, or why there is none. Both reasons are model-wide: the first is
    about every cut of the graph, the second follows a decline of each boundary by its node."""
    cands = exit_candidates(program, ctx.target)
    if not cands:
        return [], "no block boundary: no cut of the graph has a single stream value"
    cuts = choose_cuts(program, cands, ctx.option("exit_points"), ctx.stats)
    if not cuts:
        return [], "no block boundary with a 2-D/3-D/4-D float feature early enough"
    return cuts, None


def _fit_heads(program: Any, cuts: list[Cut], ctx: Any) -> FittedHeads:
    """Heads at ``cuts`` distilled on the fit split (options ``exit_steps``, ``exit_temperature``)."""
    nodes = _nodes(program.gm, [c.node for c in cuts])
    return fit_heads(program, nodes, output_values(program.gm)[0], ctx.calibration.fit,
                     steps=ctx.option("exit_steps"), temperature=float(ctx.option("exit_temperature")),
                     seed=int(getattr(ctx.budget, "seed", 0) or 0), progress=ctx.progress)


def _threshold_search(program: Any, cuts: list[Cut], fitted: FittedHeads, spec: Any, ctx: Any) -> ThresholdSearch:
    """The search over the heads' thresholds, allowed ``exit_fit_share`` of the unspent budget."""
    gm = program.gm
    classes = shape_of(output_values(gm)[0])[1]
    costs = segment_seconds(gm, [c.node for c in cuts], ctx.target)
    head_costs = [head_seconds(node, classes, ctx.target) for node in _nodes(gm, [c.node for c in cuts])]
    allowed = max(0.0, float(ctx.budget_left)) * float(ctx.option("exit_fit_share"))
    return ThresholdSearch(fitted.calibration, fitted.final, costs, head_costs, spec, ctx.evaluator,
                           ctx.calibration.fit, allowed)


def _runner_within_budget(program: Any, cuts: list[Cut], heads: list[ExitHead], taken: list[tuple[Any, Outcome]],
                          spec: Any, ctx: Any, base_drop: float, allowed: float
                          ) -> tuple[EarlyExitRunner, Outcome, list[int], float] | None:
    """The runner of the loosest setting the search took that holds for real on the fit split (the
    search scored replayed logits), with the setting, the heads kept (those that exit somebody) and the
    drop it adds; None when none holds or no head exits anybody."""
    while taken:
        _, res = taken.pop()
        keep = [k for k in range(len(cuts)) if res.rates[k] > 0]
        if not keep:
            return None
        runner = make_runner(program, [cuts[k].node for k in keep], [heads[k] for k in keep],
                             [res.thresholds[k] for k in keep], spec)
        drop = ctx.evaluator.drop(runner, "fit") - base_drop
        if drop <= allowed + 1e-12:
            return runner, res, keep, drop
    return None


def _no_exit(ctx: Any, cuts: list[Cut], allowed: float) -> bool:
    for c in cuts:
        ctx.stats.decline(RULE, c.node, "its head is not confident enough for any exit within the budget")
    ctx.note(f"no exit within {allowed:.4g} of metric drop on the fit split; nothing changed")
    return False


def _count(ctx: Any, cuts: list[Cut], keep: list[int]) -> None:
    """A match per exit kept; a decline per head the thresholds removed."""
    for k, c in enumerate(cuts):
        if k in keep:
            ctx.stats.match(RULE)
        else:
            ctx.stats.decline(RULE, c.node, "no threshold exits anybody within the budget")


def _probe_subbatch(program: Any, runner: EarlyExitRunner, ctx: Any) -> str | None:
    """Why exited samples cannot leave a batch of this graph (then everybody runs until all exited), or None."""
    batches = [b for b in ctx.calibration.fit if b.size >= 2]
    if not batches:
        batch_one = program.static_batch or all(b.size == 1 for b in ctx.calibration.holdout)
        return None if batch_one else "no calibration batch with two samples to check it on"
    b = batches[0]
    return runner.probe_subbatch(program.flat_inputs(b.args, b.kwargs), ctx.tolerance)


def _report(program: Any, ctx: Any, runner: EarlyExitRunner, kept: list[Cut], fit_res: Outcome, fit_drop: float,
            keep: list[int], head_costs: list[float]) -> dict[str, Any]:
    """Exit rates on the held-out split, the predicted (and, with ``ctx.measure``, measured) speedup:
    recorded in the report, and returned."""
    holdout = ctx.calibration.holdout
    runner.reset_counts()
    with torch.no_grad():
        for b in holdout:
            runner(*b.args, **b.kwargs)
    n = max(1, sum(runner.exit_counts))
    rates = [c / n for c in runner.exit_counts]
    # the predicted fraction with the kept heads only: segments merge where a head was removed
    seg = segment_seconds(program.gm, [c.node for c in kept], ctx.target)
    fraction = executed_fraction(rates, seg, [head_costs[k] for k in keep])
    measured: dict[str, Any] = {
        "exits": [{"node": c.node, "module": c.module, "feature": list(c.shape or ()),
                   "cost_before": round(c.fraction, 4), "threshold": runner.thresholds[i],
                   "fit_exit_rate": fit_res.rates[keep[i]], "holdout_exit_rate": rates[i]}
                  for i, c in enumerate(kept)],
        "holdout_rate_to_end": rates[-1],
        "fit_drop": fit_drop,  # added by the exits to the model's own
        "fit_changed_predictions": fit_res.changed,
        "expected_speedup": 1.0 / fraction if fraction > 0 else float("inf"),
        "batch_subset": runner.subset,
    }
    if ctx.measure and holdout:
        # at the example's batch: what the caller will run (exits pay less as the batch grows: a batch
        # leaves early only in part, and the split costs its own ops)
        batch = next((t.shape[0] for t in program.flat_inputs() if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
        samples = ctx.calibration.holdout_like(batch, 16)
        if samples:
            t = compare_models({"original": rotating(program.gm, samples), "early_exit": rotating(runner, samples)},
                               float(ctx.option("exit_measure_s")))
            measured["measured_batch"] = batch
            measured["measured_speedup"] = t["original"].median / t["early_exit"].median
    if ctx.record is not None:
        ctx.record.measured.update(measured)
    return measured
