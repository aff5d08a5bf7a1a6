"""Calibration data and the accuracy budget: what lossy passes may spend, and how it is measured.

A calibration set is any iterable of batches (a DataLoader, a list). A batch is read as:

- ``optic.Labeled(inputs, labels)``: explicit, for any model;
- a 2-tuple ``(x, y)`` where ``y`` is an integer tensor with one entry per sample of ``x`` and the
  model takes a single input: ``x`` is the input and ``y`` its labels (the usual DataLoader pair);
- a dict: keyword inputs; a tuple or list otherwise: positional inputs; a tensor: the one input.

Every tensor input must have the batch as its first dimension. The samples are pooled, shuffled
with ``Budget.seed`` and split: ``Budget.holdout`` of them form the held-out part that only the
final check reads; the passes fit on the rest.

The metric (higher is better; the *drop* is the original's score minus the candidate's):

- ``"top1"``: with labels, top-1 accuracy of the first output (argmax over its last dimension);
  without labels, top-1 agreement with the original model; what the budget counts is the share of
  samples a change breaks (right before, wrong after; or top-1 changed), fixes don't offset it;
- ``"agreement"``: top-1 agreement with the original, labels or not;
- ``"rel_error"``: ``−‖y − y₀‖ / ‖y₀‖`` over all float outputs (the original scores 0);
- ``"auto"`` (default): ``"top1"`` when the first output is ``[N, K]`` logits with K > 1, else
  ``"rel_error"``;
- a callable ``metric(outputs, target) -> float`` (higher is better), where ``target`` is the
  labels when the batch has them and the original model's outputs otherwise; the score of a split
  is the sample-weighted mean over its batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .errors import OpticError
from .verify import run_seeded

METRICS = ("auto", "top1", "agreement", "rel_error")


@dataclass(frozen=True)
class Budget:
    """How much of the metric lossy passes may spend (``max_drop``, in the metric's units: 0.01
    is one percentage point of top-1), which metric, and how much calibration data is held out."""

    max_drop: float = 0.01
    metric: str | Callable[[Any, Any], float] = "auto"
    holdout: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0 and math.isfinite(self.max_drop)):
            raise OpticError(f"Budget(max_drop={self.max_drop!r}): give a finite number ≥ 0, e.g. 0.01 for 1%")
        if isinstance(self.metric, str) and self.metric not in METRICS:
            raise OpticError(f"Budget(metric={self.metric!r}) is unknown; use one of {list(METRICS)} or a callable "
                             "metric(outputs, target) -> float (higher is better)")
        if not 0 < self.holdout < 1:
            raise OpticError(f"Budget(holdout={self.holdout!r}): the held-out fraction must be between 0 and 1")


@dataclass(frozen=True)
class Labeled:
    """An explicit calibration batch: ``inputs`` (tensor, tuple of positional inputs or dict of
    keyword inputs) and ``labels`` (one per sample)."""

    inputs: Any
    labels: torch.Tensor


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    labels: torch.Tensor | None
    size: int


@dataclass
class Calibration:
    """Calibration data split into the part passes fit on and the part only the final check reads."""

    fit: list[Batch]
    holdout: list[Batch]
    has_labels: bool
    notes: list[str] = field(default_factory=list)

    def fit_inputs(self) -> list[tuple[tuple, dict]]:
        return [(b.args, b.kwargs) for b in self.fit]

    def holdout_inputs(self) -> list[tuple[tuple, dict]]:
        return [(b.args, b.kwargs) for b in self.holdout]

    def holdout_like(self, batch: int, n: int) -> list[tuple[tuple, dict]]:
        """Up to ``n`` held-out input sets of ``batch`` samples each (to time data-dependent models on
        real data at the example's batch size)."""
        out = []
        for b in self.holdout:
            for s in range(0, b.size - batch + 1, batch):
                idx = torch.arange(s, s + batch)
                args, kwargs = _take((b.args, b.kwargs), idx)
                out.append((tuple(args), dict(kwargs)))
                if len(out) >= n:
                    return out
        return out

    @property
    def sizes(self) -> tuple[int, int]:
        return sum(b.size for b in self.fit), sum(b.size for b in self.holdout)


def _is_labels(y: Any, x: Any) -> bool:
    return (isinstance(y, torch.Tensor) and not y.is_floating_point() and not y.is_complex() and y.dim() >= 1
            and isinstance(x, torch.Tensor) and x.dim() >= 1 and y.shape[0] == x.shape[0])


def _parse(batch: Any, single_input: bool) -> tuple[tuple, dict, torch.Tensor | None]:
    labels = None
    if isinstance(batch, Labeled):
        batch, labels = batch.inputs, batch.labels
    elif (single_input and isinstance(batch, (tuple, list)) and len(batch) == 2 and _is_labels(batch[1], batch[0])):
        batch, labels = batch[0], batch[1]
    if isinstance(batch, dict):
        return (), dict(batch), labels
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}, labels
    return (batch,), {}, labels


def _batch_size(args: tuple, kwargs: dict, where: int) -> int:
    sizes = {t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise OpticError(f"calibration batch {where}: every tensor input needs the batch as its first dimension, "
                         f"found first dimensions {sorted(sizes) or 'none'}; wrap batches as optic.Labeled(inputs, "
                         "labels) or pass inputs shaped like example_inputs")
    return sizes.pop()


def _take(tree: Any, idx: torch.Tensor) -> Any:
    return pytree.tree_map(lambda t: t[idx] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, tree)


def _cat(trees: list[Any]) -> Any:
    leaves = [pytree.tree_flatten(t) for t in trees]
    spec = leaves[0][1]
    cols = list(zip(*[lv for lv, _ in leaves], strict=True))
    out = [torch.cat(c) if isinstance(c[0], torch.Tensor) and c[0].dim() > 0 else c[0] for c in cols]
    return pytree.tree_unflatten(out, spec)


def split(data: Iterable[Any], budget: Budget, single_input: bool, batch_size: int | None) -> Calibration:
    """Read, pool, shuffle and split calibration batches (see the module docstring).

    ``batch_size``: the batch the model runs with (a graph specialized to the example batch needs
    it); None keeps batches of up to 256 samples."""
    if data is None:
        raise OpticError("budget= needs calibration= data: an iterable of batches (e.g. a DataLoader) shaped like "
                         "example_inputs, optionally with labels")
    parsed = []
    for i, b in enumerate(data):
        args, kwargs, labels = _parse(b, single_input)
        n = _batch_size(args, kwargs, i)
        if labels is not None and labels.shape[0] != n:
            raise OpticError(f"calibration batch {i}: {labels.shape[0]} labels for {n} samples")
        parsed.append((args, kwargs, labels, n))
    if not parsed:
        raise OpticError("calibration= is empty: give at least two samples (some are held out for the final check)")
    with_labels = [p[2] is not None for p in parsed]
    if any(with_labels) and not all(with_labels):
        raise OpticError("calibration mixes labeled and unlabeled batches: label all of them or none")
    total = sum(p[3] for p in parsed)
    if total < 2:
        raise OpticError("calibration= holds one sample: give at least two (some are held out for the final check)")
    pooled = _cat([(p[0], p[1], p[2]) for p in parsed]) if len(parsed) > 1 else (parsed[0][0], parsed[0][1], parsed[0][2])
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(budget.seed))
    n_hold = min(total - 1, max(1, round(total * budget.holdout)))
    cal = Calibration([], [], all(with_labels))
    bs = batch_size or min(256, total)
    for name, idx in (("fit", perm[n_hold:]), ("holdout", perm[:n_hold])):
        idx = idx.sort().values
        usable = (len(idx) // bs) * bs if batch_size else len(idx)
        if batch_size and usable == 0:
            raise OpticError(f"the {name} part of calibration= has {len(idx)} samples, fewer than the batch of "
                             f"{batch_size} this captured graph is specialized to; give more calibration data or "
                             "example inputs with a smaller batch")
        if usable < len(idx):
            cal.notes.append(f"{len(idx) - usable} {name} samples dropped to fill whole batches of {batch_size}")
        for s in range(0, usable, bs):
            args, kwargs, labels = _take(pooled, idx[s:s + bs])
            getattr(cal, name).append(Batch(tuple(args), dict(kwargs), labels, min(bs, usable - s)))
    return cal


# -- metric ----------------------------------------------------------------------------------------
def _first_float(out: Any) -> torch.Tensor | None:
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    return None


def _floats(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class Evaluator:
    """Scores models on the calibration splits against the original model (outputs computed once)."""

    def __init__(self, budget: Budget, calibration: Calibration, original: Callable):
        self.budget, self.calibration = budget, calibration
        self.reference = {s: [run_seeded(original, b.args, b.kwargs) for b in getattr(calibration, s)]
                          for s in ("fit", "holdout")}
        self.metric = self._resolve_metric()
        self.base = {s: self.score(original, s) for s in ("fit", "holdout")}
        self.evaluations = 0

    def _resolve_metric(self) -> str | Callable:
        m = self.budget.metric
        if m != "auto":
            return m
        first = _first_float(self.reference["fit"][0])
        return "top1" if first is not None and first.dim() == 2 and first.shape[1] > 1 else "rel_error"

    @property
    def metric_name(self) -> str:
        m = self.metric
        if callable(m):
            return getattr(m, "__name__", "custom metric")
        if m == "top1":
            return "top-1 accuracy" if self.calibration.has_labels else "top-1 agreement with the original"
        return {"agreement": "top-1 agreement with the original", "rel_error": "−relative output error"}[m]

    def _batch_score(self, out: Any, ref: Any, labels: torch.Tensor | None) -> float:
        m = self.metric
        if callable(m):
            return float(m(out, labels if labels is not None else ref))
        if m == "rel_error":
            num = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(_floats(out), _floats(ref), strict=True))
            den = sum(float(r.float().pow(2).sum()) for r in _floats(ref))
            return -math.sqrt(num / max(den, 1e-30))
        pred = _first_float(out).argmax(-1)
        want = labels if (m == "top1" and labels is not None) else _first_float(ref).argmax(-1)
        return float((pred.reshape(-1) == want.reshape(-1).to(pred.device)).float().mean())

    def score(self, model: Callable, split: str = "fit") -> float:
        """The metric of ``model`` (a Program or any callable) on ``split`` ("fit" or "holdout")."""
        total, weight = 0.0, 0
        with torch.no_grad():
            for b, ref in zip(getattr(self.calibration, split), self.reference[split], strict=True):
                total += self._batch_score(run_seeded(model, b.args, b.kwargs), ref, b.labels) * b.size
                weight += b.size
        return total / max(weight, 1)

    def drop(self, model: Callable, split: str = "fit") -> float:
        """What ``model`` spends of the budget on ``split``.

        For top-1 metrics, the share of samples it gets wrong that the original got right (with
        labels) or whose top-1 it changes (without): a change that breaks some samples and fixes
        as many others is not free, because at calibration sizes the fixes are noise that does not
        carry over to new data (measured on the digits examples: net drops of 0 on the fit split
        became 1.5 points on the test split). This bounds the drop in accuracy from above. Other
        metrics: the original's score minus the model's (negative when it scores higher)."""
        self.evaluations += 1
        m = self.metric
        if callable(m) or m == "rel_error":
            return self.base[split] - self.score(model, split)
        lost, weight = 0.0, 0
        with torch.no_grad():
            for b, ref in zip(getattr(self.calibration, split), self.reference[split], strict=True):
                pred = _first_float(run_seeded(model, b.args, b.kwargs)).argmax(-1).reshape(-1)
                orig = _first_float(ref).argmax(-1).reshape(-1).to(pred.device)
                if m == "top1" and b.labels is not None:
                    want = b.labels.reshape(-1).to(pred.device)
                    broken = (orig == want) & (pred != want)
                else:
                    broken = pred != orig
                lost += float(broken.float().sum()) / broken.numel() * b.size
                weight += b.size
        return lost / max(weight, 1)


# -- activations -----------------------------------------------------------------------------------
def iter_values(program: Any, nodes: list[fx.Node], inputs: Iterable[tuple[tuple, dict]]) -> Iterator[dict[str, Any]]:
    """The values of ``nodes`` (of ``program.gm``) on each input set in turn, by node name: one
    batch of activations in memory at a time, the probe built once.

    Runs a copy of the graph that returns the probed values (the Program is not changed); placeholders
    are fed positionally, so fx- and export-captured graphs are probed alike."""
    import copy
    import warnings

    with warnings.catch_warnings():  # torch's pytree specs warn when deep-copied
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(program.gm.graph)
    graph._codegen = fx.graph.CodeGen()  # plain positional call, raw tuple out (no pytree specs)
    by_name = {n.name: n for n in graph.nodes}
    out_node = next(n for n in graph.nodes if n.op == "output")
    out_node.args = (tuple(by_name[n.name] for n in nodes),)
    probe = fx.GraphModule(program.gm, graph)
    for args, kwargs in inputs:
        with torch.no_grad():
            values = probe(*program.flat_inputs(args, kwargs))
        yield {n.name: v for n, v in zip(nodes, values, strict=True)}


def record_values(program: Any, nodes: list[fx.Node], inputs: list[tuple[tuple, dict]]) -> dict[str, list]:
    """The values of ``nodes`` (of ``program.gm``) on each input set, by node name (all kept)."""
    result: dict[str, list] = {n.name: [] for n in nodes}
    for values in iter_values(program, nodes, inputs):
        for name, v in values.items():
            result[name].append(v)
    return result
