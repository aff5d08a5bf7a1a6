"""Calibration data and the accuracy budget: what lossy passes may spend, and how it is measured.

A calibration set is any iterable of batches (a DataLoader, a list). A batch is read as:

- ``optic.Labeled(inputs, labels)``: explicit, for any model;
- a 2-tuple ``(x, y)`` of tensors when the model takes a single input: ``x`` is the input and ``y``
  its labels (the usual DataLoader pair), whatever ``y``'s dtype: such a model cannot take two inputs,
  so reading a float ``y`` as a second input would only fail later. Top-1 then asks for integer class
  indices; float targets are for a callable metric;
- a dict: keyword inputs; a tuple or list otherwise: positional inputs; a tensor: the one input.

Every tensor input must have the batch as its first dimension, and the batches may differ only there
(same inputs, shapes otherwise and dtypes). The samples are pooled, shuffled with ``Budget.seed`` and
split: ``Budget.holdout`` of them form the held-out part that only the final check reads; the passes
fit on the rest.

Before anything is computed on the calibration data (:class:`Evaluator`), the original model runs on
the first batch: a batch it cannot take is a :class:`CalibrationError` naming the batch, its shapes
and the example's. Labels for top-1 must be integer class indices, one per sample (one per position
for outputs ``[N, ..., K]``), in ``[0, K)``; a batch whose labels are not is named too.

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

from ..errors import CalibrationError, OpticError
from ..ir.program import Program
from ..pipeline.verify import run_seeded

METRICS = ("auto", "top1", "agreement", "rel_error")
ACCEPTED = ("a batch is the model's inputs (shaped like example_inputs), an (inputs, labels) pair for a "
            "single-input model, or optic.Labeled(inputs, labels)")


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
    # as given, for the checks against the model (:func:`check`): the first batch and every batch's labels
    first: Batch | None = None
    labels_by_batch: list[torch.Tensor] = field(default_factory=list)
    batch_size: int | None = None  # the batch a graph specialized to the example's batch runs with

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
                idx = torch.arange(s, s + batch, device="cpu")
                args, kwargs = _take((b.args, b.kwargs), idx)
                out.append((tuple(args), dict(kwargs)))
                if len(out) >= n:
                    return out
        return out

    @property
    def sizes(self) -> tuple[int, int]:
        return sum(b.size for b in self.fit), sum(b.size for b in self.holdout)


def _is_pair(batch: Any) -> bool:
    return (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in batch))


def _parse(batch: Any, single_input: bool) -> tuple[tuple, dict, torch.Tensor | None]:
    labels = None
    if isinstance(batch, Labeled):
        batch, labels = batch.inputs, batch.labels
    elif single_input and _is_pair(batch):
        batch, labels = batch[0], batch[1]
    if isinstance(batch, dict):
        return (), dict(batch), labels
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}, labels
    return (batch,), {}, labels


def _batch_size(args: tuple, kwargs: dict, where: int) -> int:
    sizes = {t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
    if len(sizes) != 1:
        raise CalibrationError(f"calibration batch {where}: every tensor input needs the batch as its first "
                               f"dimension, found first dimensions {sorted(sizes) or 'none'}; wrap batches as "
                               "optic.Labeled(inputs, labels) or pass inputs shaped like example_inputs")
    return sizes.pop()


def _describe(tree: Any) -> str:
    """``[6, 3, 8, 8] float32, ...`` for the tensors of ``tree``."""
    leaves = [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]
    return ", ".join(f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in leaves) or "no tensors"


def _check_like_first(i: int, batch: tuple, first: tuple) -> None:
    """Batches are pooled with ``torch.cat``: they may differ in the batch size only."""
    (args, kwargs, labels, _), (args0, kwargs0, labels0, _) = batch, first
    leaves, spec = pytree.tree_flatten((args, kwargs))
    leaves0, spec0 = pytree.tree_flatten((args0, kwargs0))
    if spec != spec0:
        raise CalibrationError(f"calibration batch {i}: its inputs ({_describe((args, kwargs))}) are not arranged "
                               f"like calibration batch 0's ({_describe((args0, kwargs0))}); {ACCEPTED}")
    pairs = [(f"input {j}", a, b) for j, (a, b) in enumerate(zip(leaves, leaves0, strict=True))]
    for what, a, b in [*pairs, ("labels", labels, labels0)]:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            continue
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
            raise CalibrationError(f"calibration batch {i}: {what} is {_describe(a)} where calibration batch 0 has "
                                   f"{_describe(b)}; batches may differ in their batch size (the first "
                                   "dimension) only")


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
        raise CalibrationError("budget= needs calibration= data: an iterable of batches (e.g. a DataLoader) shaped "
                               "like example_inputs, optionally with labels")
    parsed = []
    for i, b in enumerate(data):
        args, kwargs, labels = _parse(b, single_input)
        n = _batch_size(args, kwargs, i)
        if labels is not None and labels.shape[0] != n:
            raise CalibrationError(f"calibration batch {i}: {labels.shape[0]} labels for {n} samples; give one "
                                   "label per sample (the first dimension of labels and inputs must agree)")
        parsed.append((args, kwargs, labels, n))
        if (parsed[0][2] is None) != (labels is None):
            state = ("labeled", "unlabeled") if labels is None else ("unlabeled", "labeled")
            raise CalibrationError(f"calibration mixes labeled and unlabeled batches (batch 0 is {state[0]}, batch "
                                   f"{i} is {state[1]}): label all of them or none")
        _check_like_first(i, parsed[-1], parsed[0])
    if not parsed:
        raise CalibrationError("calibration= is empty: give at least two samples (some are held out for the final "
                               "check)")
    total = sum(p[3] for p in parsed)
    if total < 2:
        raise CalibrationError("calibration= holds one sample: give at least two (some are held out for the final "
                               "check)")
    pooled = _cat([(p[0], p[1], p[2]) for p in parsed]) if len(parsed) > 1 else (parsed[0][0], parsed[0][1], parsed[0][2])
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(budget.seed))
    n_hold = min(total - 1, max(1, round(total * budget.holdout)))
    first = Batch(*parsed[0])
    cal = Calibration([], [], first.labels is not None, first=first, batch_size=batch_size,
                      labels_by_batch=[p[2] for p in parsed if p[2] is not None])
    bs = batch_size or min(256, total)
    for name, idx in (("fit", perm[n_hold:]), ("holdout", perm[:n_hold])):
        idx = idx.sort().values
        usable = (len(idx) // bs) * bs if batch_size else len(idx)
        if batch_size and usable == 0:
            raise CalibrationError(f"the {name} part of calibration= has {len(idx)} samples, fewer than the batch "
                                   f"of {batch_size} this captured graph is specialized to; give more calibration "
                                   "data or example inputs with a smaller batch")
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


def resolve_metric(metric: str | Callable, output: Any) -> str | Callable:
    """The metric ``Budget.metric`` names for a model whose output is ``output`` ("auto" resolved)."""
    if metric != "auto":
        return metric
    first = _first_float(output)
    return "top1" if first is not None and first.dim() == 2 and first.shape[1] > 1 else "rel_error"


# -- checks against the model ----------------------------------------------------------------------
def check(calibration: Calibration, model: Callable, metric: str | Callable) -> None:
    """Run ``model`` on the first calibration batch and check every batch's labels against its output,
    so that bad calibration data is a :class:`CalibrationError` naming the batch before any work.

    Appends a note to ``calibration.notes`` when the metric does not read the labels."""
    first = calibration.first
    if first is None:
        return
    args, kwargs = first.args, first.kwargs
    if calibration.batch_size and first.size != calibration.batch_size:  # a graph specialized to the example batch
        args, kwargs = _take((args, kwargs), torch.arange(calibration.batch_size, device="cpu") % first.size)
    try:
        out = run_seeded(model, tuple(args), dict(kwargs))
    except Exception as e:  # whatever torch raises deep inside the model, named at the batch
        why = (str(e).strip().splitlines() or [""])[0][:240]
        got = _describe((first.args, first.kwargs))
        example = ""
        if isinstance(model, Program):
            example = f"; the example inputs are {_describe((model.example_args, model.example_kwargs))}"
        raise CalibrationError(f"calibration batch 0: the model fails on its inputs {got} "
                               f"({type(e).__name__}: {why}){example}; {ACCEPTED}") from None
    if not calibration.has_labels or callable(metric):
        return
    metric = resolve_metric(metric, out)
    logits = _first_float(out)
    if metric != "top1":
        calibration.notes.append(f"calibration labels are not used by the {metric!r} metric (it compares with the "
                                 "original model's outputs)")
        return
    if logits is None or logits.dim() < 2:  # no class dimension to check the labels against
        return
    for i, labels in enumerate(calibration.labels_by_batch):
        _check_class_indices(i, labels, logits)


def _check_class_indices(i: int, labels: torch.Tensor, logits: torch.Tensor) -> None:
    n, k, per_sample = labels.shape[0], logits.shape[-1], list(logits.shape[1:-1])
    if labels.is_floating_point() or labels.is_complex():
        raise CalibrationError(f"calibration batch {i}: the labels are {_describe(labels)}, but top-1 needs integer "
                               f"class indices (labels.long()); for float targets give Budget(metric=...) a callable "
                               f"metric(outputs, target); {ACCEPTED}")
    if labels.numel() != n * math.prod(per_sample):
        raise CalibrationError(f"calibration batch {i}: labels have shape {list(labels.shape)}, but top-1 needs one "
                               f"class index per sample, shape {[n, *per_sample]} (the model's first output is "
                               f"{list(logits.shape)} for a batch of {logits.shape[0]}); one-hot labels become "
                               "indices with labels.argmax(-1)")
    outside = (labels < 0) | (labels >= k)
    if bool(outside.any()):
        bad, more = int(labels[outside][0]), int(outside.sum()) - 1
        also = f" (and {more} others)" if more else ""
        raise CalibrationError(f"calibration batch {i}: label {bad}{also} is outside the {k} classes the model "
                               f"scores (0 to {k - 1}: the last dimension of its first output "
                               f"{list(logits.shape)}); labels are class indices")


class Evaluator:
    """Scores models on the calibration splits against the original model (outputs computed once)."""

    def __init__(self, budget: Budget, calibration: Calibration, original: Callable):
        self.budget, self.calibration = budget, calibration
        check(calibration, original, budget.metric)  # before anything runs on the calibration data
        self.reference = {s: [run_seeded(original, b.args, b.kwargs) for b in getattr(calibration, s)]
                          for s in ("fit", "holdout")}
        self.metric = resolve_metric(budget.metric, self.reference["fit"][0])
        self.base = {s: self.score(original, s) for s in ("fit", "holdout")}
        self.evaluations = 0

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
        return self._drop(model, split, risk=False)[0]

    def assess(self, model: Callable, split: str = "fit") -> tuple[float, float]:
        """``(drop, risk)`` of ``model`` on ``split``: :meth:`drop`, and how close the model came to dropping
        more. For top-1 metrics the risk is the mean share of each sample's top-1 margin the model used up
        (the original's top logit over its runner-up: a sample flips when it is all used): two changes
        that flip nothing are told apart by how near they bring the weakest samples to flipping. Other
        metrics: the drop itself (already continuous)."""
        return self._drop(model, split, risk=True)

    def _drop(self, model: Callable, split: str, risk: bool) -> tuple[float, float]:
        """:meth:`drop` and, with ``risk``, :meth:`assess`'s risk (else 0: the margins are not computed)."""
        self.evaluations += 1
        m = self.metric
        if callable(m) or m == "rel_error":
            drop = self.base[split] - self.score(model, split)
            return drop, max(drop, 0.0)
        lost, used, weight = 0.0, 0.0, 0
        with torch.no_grad():
            for b, ref in zip(getattr(self.calibration, split), self.reference[split], strict=True):
                out = _first_float(run_seeded(model, b.args, b.kwargs))
                r = _first_float(ref).to(out.device)
                pred = out.argmax(-1).reshape(-1)
                orig = r.argmax(-1).reshape(-1)
                if m == "top1" and b.labels is not None:
                    want = b.labels.reshape(-1).to(pred.device)
                    broken = (orig == want) & (pred != want)
                else:
                    broken = pred != orig
                n = broken.numel()
                lost += float(broken.float().sum()) / n * b.size
                if risk:
                    used += float(margin_used(out.reshape(n, -1), r.reshape(n, -1)).sum()) / n * b.size
                weight += b.size
        return lost / max(weight, 1), used / max(weight, 1)


def margin_used(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row of ``ref`` (logits, classes last): the share of its top-1 margin (top logit minus the runner-up)
    that ``out`` used up, in [0, 1]; 1 where the top-1 changed or the margin was zero."""
    if ref.shape[-1] < 2:
        return torch.zeros(ref.shape[0], device=ref.device)
    # the two largest logits of each row, not a masked copy of the whole (a language model's vocabulary)
    best, idx = ref.topk(2, -1)
    top = idx[:, :1]
    margin = best[:, 0].double() - best[:, 1].double()
    o_best, o_idx = out.topk(2, -1)
    rival = torch.where(o_idx[:, 0] == top[:, 0], o_best[:, 1], o_best[:, 0])  # out's largest other than top
    now = out.gather(-1, top).squeeze(-1).double() - rival.double()
    share = torch.where(margin > 0, (margin - now) / margin.clamp_min(1e-300), torch.ones_like(margin))
    return share.clamp(0.0, 1.0)


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
