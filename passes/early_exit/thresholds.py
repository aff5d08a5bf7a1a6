"""Confidence thresholds of the exits, searched on the fit split within the budget.

A sample leaves at the first head whose max softmax probability reaches the head's threshold. Each
head's thresholds are a grid of its confidence quantiles on the fit split (strict to loose: ``NEVER``,
then the levels that let 1 %, 2 %, 5 % … 100 % of the samples leave). From "no head exits anybody",
each greedy step loosens one head by one or more levels, taking the loosening with the largest
predicted saving per unit of metric drop (the drop-free ones first); a setting is allowed while the
share of changed top-1 predictions and the metric drop (``ctx.evaluator`` on the fit split, scored on
replayed logits without running the backbone again) stay within ``allowed``.

The predicted saving is the expected share of the model's cost a sample executes
(:func:`executed_fraction`): a sample leaving at head k pays segments 0..k and heads 0..k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .heads import confidence

NEVER = 1.01  # a threshold no softmax probability reaches
_ARGMAX_METRICS = ("top1", "agreement")  # metrics that read only each sample's top-1
_EXIT_RATES = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

State = tuple[int, ...]  # per head, the index of its threshold level (-1: NEVER)


def executed_fraction(rates: list[float], costs: list[float], head_costs: list[float]) -> float:
    """Expected share of the model's predicted cost a sample executes, when ``rates[k]`` of the
    samples leave at head k (after segments 0..k and heads 0..k) and ``rates[-1]`` run to the end."""
    base = sum(costs)
    spent, expected = 0.0, 0.0
    for k, r in enumerate(rates[:-1]):
        spent += costs[k] + head_costs[k]
        expected += r * spent
    expected += rates[-1] * (base + sum(head_costs))
    return expected / base if base > 0 else 1.0


def threshold_levels(conf: torch.Tensor) -> list[float]:
    """One head's threshold grid from its confidences on the fit split, strictest first."""
    qs = torch.tensor([1.0 - r for r in _EXIT_RATES], dtype=torch.float64, device="cpu")
    values = torch.quantile(conf.double().cpu(), qs, interpolation="lower").tolist()
    return sorted(set(values), reverse=True)


@dataclass
class Outcome:
    thresholds: list[float]
    rates: list[float]  # share of samples leaving at each head, then the share running to the end
    changed: float  # share of samples whose top-1 differs from the model's
    fraction: float  # expected share of the model's predicted cost executed per sample
    drop: float = 0.0


class _Replay:
    """The early-exit model on the fit batches, from cached head and final logits (what the runner
    returns on them, checked once at the end): lets the evaluator score threshold settings without
    running the backbone again."""

    def __init__(self, batches: list[Any]):
        self.keys = {self._key(b.args, b.kwargs): i for i, b in enumerate(batches)}
        self.outputs: list[Any] = []

    @staticmethod
    def _key(args: tuple, kwargs: dict) -> int:
        return id(next(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)))

    def __call__(self, *args, **kwargs):
        return self.outputs[self.keys[self._key(args, kwargs)]]


class ThresholdSearch:
    """Per-head thresholds on the fit split (see the module docstring)."""

    def __init__(self, heads: list[list[torch.Tensor]], final: list[torch.Tensor], costs: list[float],
                 head_costs: list[float], out_spec: Any, evaluator: Any, batches: list[Any], allowed: float):
        self.heads, self.final = heads, final  # per head: per batch [n_b, K]; per batch [n_b, K]
        self.conf = [torch.cat([confidence(z) for z in per]) for per in heads]
        self.pred = [torch.cat([z.argmax(-1) for z in per]) for per in heads]
        self.pred_final = torch.cat([z.argmax(-1) for z in final])
        self.sizes = [z.shape[0] for z in final]
        self.costs, self.head_costs, self.out_spec = costs, head_costs, out_spec
        self.evaluator, self.allowed = evaluator, allowed
        self.replay = _Replay(batches)
        self.levels = [threshold_levels(c) for c in self.conf]
        self._seen: dict[State, Outcome | None] = {}
        self.base_drop = 0.0  # the model's own drop (earlier lossy passes); exits may add ``allowed``
        self.start: State = tuple([-1] * len(heads))  # no head exits anybody

    def thresholds(self, state: State) -> list[float]:
        return [NEVER if j < 0 else self.levels[k][j] for k, j in enumerate(state)]

    def exit_at(self, thresholds: list[float]) -> torch.Tensor:
        """Per fit sample, the head it leaves at (len(heads): none)."""
        at = torch.full_like(self.pred_final, len(self.heads))
        for k in reversed(range(len(self.heads))):
            at = torch.where(self.conf[k] >= thresholds[k], torch.full_like(at, k), at)
        return at

    # -- one setting -------------------------------------------------------------------------------
    def outcome(self, state: State) -> Outcome | None:
        """What a threshold setting gives on the fit split; None when it spends more than allowed."""
        if state not in self._seen:
            self._seen[state] = self._outcome(state)
        return self._seen[state]

    def _outcome(self, state: State) -> Outcome | None:
        th = self.thresholds(state)
        at = self.exit_at(th)
        changed = float((self._predictions(at) != self.pred_final).float().mean())
        rates = [float((at == k).float().mean()) for k in range(len(self.heads) + 1)]
        res = Outcome(th, rates, changed, executed_fraction(rates, self.costs, self.head_costs))
        if changed > self.allowed + 0.5 / at.numel():  # half a sample: the share is a count
            return None
        if changed == 0 and self.evaluator.metric in _ARGMAX_METRICS and state != self.start:
            res.drop = self.base_drop  # the same top-1 everywhere: the same score
            return res
        self.replay.outputs = self._replayed_outputs(at)
        res.drop = self.evaluator.drop(self.replay, "fit")
        return res if res.drop <= self.base_drop + self.allowed + 1e-12 else None

    def _predictions(self, at: torch.Tensor) -> torch.Tensor:
        """Per fit sample, the top-1 of the head it leaves at, else the model's."""
        pred = self.pred_final.clone()
        for k in range(len(self.heads)):
            pred = torch.where(at == k, self.pred[k], pred)
        return pred

    def _replayed_outputs(self, at: torch.Tensor) -> list[Any]:
        """Per fit batch, what the runner returns when the samples leave at ``at``."""
        outputs, start = [], 0
        for b, size in enumerate(self.sizes):
            a = at[start:start + size]
            z = self.final[b].clone()
            for k in range(len(self.heads)):
                sel = a == k
                z[sel] = self.heads[k][b][sel].to(z.dtype)
            outputs.append(pytree.tree_unflatten([z], self.out_spec))
            start += size
        return outputs

    # -- the greedy search -------------------------------------------------------------------------
    def search(self, progress: Any = None) -> list[tuple[State, Outcome]]:
        """Greedy steps from "no head exits anybody"; the settings taken, in order (last = best)."""
        state = self.start
        self.base_drop = float("inf")  # the start is scored, never refused
        cur = self.outcome(state)
        self.base_drop = cur.drop
        steps = [(state, cur)]
        budget_steps = sum(len(lv) for lv in self.levels)
        while (best := self._best_step(state, cur)) is not None:
            state, cur = best
            steps.append(best)
            if progress is not None:
                progress("calibrating exit thresholds", len(steps) - 1, budget_steps)
        return steps

    def _best_step(self, state: State, cur: Outcome) -> tuple[State, Outcome] | None:
        """The loosening of one head that saves the most per unit of added drop (free ones first)."""
        best, best_key = None, None
        for k, lv in enumerate(self.levels):
            misses = 0
            for j in range(state[k] + 1, len(lv)):
                trial = state[:k] + (j,) + state[k + 1:]
                res = self.outcome(trial)
                if res is None:
                    misses += 1
                    if misses == 2:  # looser still spends more (nearly always): stop early
                        break
                    continue
                misses = 0
                gain = cur.fraction - res.fraction
                if gain <= 0:
                    continue
                d_drop = max(res.drop - cur.drop, 0.0)
                key = (d_drop <= 1e-12, gain / max(d_drop, 1e-12))
                if best_key is None or key > best_key:
                    best, best_key = (trial, res), key
        return best
