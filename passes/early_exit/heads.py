"""Exit heads and their training by self-distillation.

A head maps the feature at a cut to ``[N, K]`` logits: ``[N,C,H,W]`` global average pool → Linear;
``[N,T,D]`` mean over T → LayerNorm → Linear; ``[N,D]`` → Linear. It is trained with the backbone
frozen, on features pooled once on the fit split, from the model's own logits ``z``::

    L = Σ_heads T²·KL(softmax(z/T) ‖ softmax(h/T)) + CE(h, labels)   (CE when the split is labeled)

with Adam, seeded and deterministic (the linears start at zero). Rank-2/4 features are standardized
while training and the standardization is folded into the linear afterwards: ``W' = W/σ``,
``b' = b − W'·μ``. The thresholds are calibrated on logits from heads that did not see the sample
(:func:`out_of_fold_logits`): heads judged on what they were trained on look more reliable than they are.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from optic import device
from optic.backend import exit_head
from optic.budget.calibration import iter_values
from optic.ir.graph import shape as shape_of
from optic.pipeline import cost
from optic.tvm_compat import tvm_tensors

CROSS_FIT_FOLDS = 2
CROSS_FIT_MIN_SAMPLES = 20  # fewer fit samples: the heads are judged on what they were trained on


class ExitHead(nn.Module):
    """Feature → logits (see the module docstring). Runs in float32 whatever the model's dtype."""

    def __init__(self, rank: int, width: int, classes: int):
        super().__init__()
        self.rank = rank
        # made on the CPU (the same initial weights whatever the device), then moved to the features' device
        self.norm = nn.LayerNorm(width, device="cpu") if rank == 3 else None
        self.fc = nn.Linear(width, classes, device="cpu")

    def pool(self, feature: torch.Tensor) -> torch.Tensor:
        x = feature.float()
        if self.rank >= 3:
            x = x.mean(dim=tuple(range(2, x.dim()))) if self.rank == 4 else x.mean(dim=1)
        return x

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        # F.linear, not the module's call: the same op, without a module dispatch (a head runs per sample at batch 1)
        return F.linear(self.norm(pooled) if self.norm is not None else pooled, self.fc.weight, self.fc.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        got = self._generated(feature)
        return got[0] if got is not None else self.classify(self.pool(feature))

    def scores(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, confidence): what the runner reads after a cut, in one generated kernel where it runs
        (:mod:`optic.backend.exit_head`: inference on the CPU in float32), else by the head's ops."""
        got = self._generated(feature)
        if got is not None:
            return got
        logits = self.classify(self.pool(feature))
        return logits, confidence(logits)

    def _generated(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The head and its confidence by the generated kernel, or None where it does not run (training,
        another device or dtype, no TVM): the same function, summed in another order."""
        if torch.is_grad_enabled():
            return None
        plans = self.__dict__.setdefault("_kernel_plans", {})
        key = (feature.shape, feature.stride(), feature.dtype, feature.device)
        plan = plans.get(key, False)
        if plan is False:  # first call on features like these: the kernel, or None
            found = exit_head.head_kernel(feature, self.fc.out_features,
                                          self.norm.eps if self.norm is not None else None)
            plan = plans[key] = None if found is None else (found[0], exit_head.strides(feature, found[1]))
        if plan is None:
            return None
        fn, want = plan
        consts = self._kernel_constants()
        if feature.stride() != want:
            feature = feature.as_strided(feature.shape, want)
        n, k = feature.shape[0], consts[-1]
        # on the feature's device, not the default one (a user may have set that to another)
        logits, conf = torch.empty((n, k), device=feature.device), torch.empty((n,), device=feature.device)
        fn(feature, *consts[:-1], logits, conf)
        return logits, conf

    def _kernel_constants(self) -> tuple:
        """The kernel's weight arguments (W transposed and padded to whole vectors, the bias, the norm's affine)
        as TVM tensors, then the number of classes; made again when a parameter was replaced or changed in
        place (a head is called per sample at batch 1: the parameters are read from the modules' own dicts)."""
        fc, norm = self._modules["fc"], self._modules.get("norm")
        params = [fc._parameters["weight"], fc._parameters["bias"]]
        if norm is not None:
            params += [norm._parameters["weight"], norm._parameters["bias"]]
        cached = self.__dict__.get("_kernel_consts")
        if cached is not None and len(cached[0]) == len(params) and all(
                t is c and (t is None or t._version == v) for t, (c, v) in zip(params, cached[0], strict=True)):
            return cached[1]
        with torch.no_grad():
            w = params[0].detach().float().cpu()
            k, c = w.shape
            k16 = -(-k // exit_head.LANES) * exit_head.LANES
            wt = torch.zeros(c, k16, device="cpu")
            wt[:, :k] = w.t()
            b = torch.zeros(k16, device="cpu")
            if params[1] is not None:
                b[:k] = params[1].detach().float().cpu()
            gamma, beta = torch.ones(c, device="cpu"), torch.zeros(c, device="cpu")
            if norm is not None and params[2] is not None:
                gamma = params[2].detach().float().cpu().clone()
            if norm is not None and params[3] is not None:
                beta = params[3].detach().float().cpu().clone()
        consts = (*tvm_tensors(wt, b, gamma, beta), k)
        self.__dict__["_kernel_consts"] = ([(t, None if t is None else t._version) for t in params], consts)
        return consts

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_kernel_consts", None)  # TVM tensors and compiled kernels: made again on use
        state.pop("_kernel_plans", None)
        return state


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability per sample: what an exit's threshold is compared with."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def feature_width(s: tuple[int, ...]) -> int:
    """What a head's linear reads: channels of [N,C,H,W], features of [N,T,D] and [N,D]."""
    return s[-1] if len(s) == 3 else s[1]


def head_seconds(cut: fx.Node, classes: int, target: Any) -> float:
    """Predicted seconds of a head on the target: pooling the feature, then the linear."""
    s = shape_of(cut)
    numel, width, batch = math.prod(s), feature_width(s), s[0]
    pool = cost.kernel_seconds(numel, numel * 4, target) if len(s) > 2 else 0.0
    return pool + cost.kernel_seconds(2 * batch * width * classes, 4 * width * (classes + batch), target)


# -- training ----------------------------------------------------------------------------------------
def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + CE(student, labels) when labeled."""
    t = temperature
    loss = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
    if labels is not None:
        loss = loss + F.cross_entropy(student, labels)
    return loss


def train_heads(heads: list[ExitHead], pooled: list[torch.Tensor], teacher: torch.Tensor,
                labels: torch.Tensor | None, *, steps: int = 300, temperature: float = 2.0, lr: float = 1e-2,
                batch: int = 128, seed: int = 0, progress: Any = None) -> None:
    """Train ``heads`` on pooled features (one ``[n, C]`` tensor per head) in place, all at once, then
    freeze them (see the module docstring for the loss and the folded standardization)."""
    standardization = _start_at_zero(heads, pooled)
    xs = [(x - mu) / sd for x, (mu, sd) in zip(pooled, standardization, strict=True)]
    _distill(heads, xs, teacher.float(), labels, steps=steps, temperature=temperature, lr=lr, batch=batch,
             seed=seed, progress=progress)
    _fold_standardization(heads, standardization)
    for h in heads:
        h.eval()
        h.requires_grad_(False)


def _start_at_zero(heads: list[ExitHead], pooled: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zero every head's linear; per head the (μ, σ) its features are standardized by (none behind a
    LayerNorm, which normalizes by itself)."""
    standardization = []
    for head, x in zip(heads, pooled, strict=True):
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.bias.zero_()
        if head.norm is None:
            mu, sd = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        else:
            mu, sd = torch.zeros_like(x[0]), torch.ones_like(x[0])
        standardization.append((mu, sd))
    return standardization


def _distill(heads: list[ExitHead], xs: list[torch.Tensor], teacher: torch.Tensor, labels: torch.Tensor | None, *,
             steps: int, temperature: float, lr: float, batch: int, seed: int, progress: Any) -> None:
    """Adam on the summed distillation loss of all heads, minibatches drawn by a seeded generator."""
    n = teacher.shape[0]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for h in heads for p in h.parameters()], lr=lr)
    every = max(1, steps // 20)
    with torch.enable_grad():
        for step in range(steps):
            idx = device.randint(0, n, (min(batch, n),), gen, teacher.device)
            loss = sum(distill_loss(h.classify(x[idx]), teacher[idx], None if labels is None else labels[idx],
                                    temperature) for h, x in zip(heads, xs, strict=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress is not None and (step % every == 0 or step == steps - 1):
                progress("training exit heads", step + 1, steps)


def _fold_standardization(heads: list[ExitHead], standardization: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``W' = W/σ``, ``b' = b − W'·μ``: the heads then read raw pooled features."""
    with torch.no_grad():
        for head, (mu, sd) in zip(heads, standardization, strict=True):
            w = head.fc.weight / sd
            head.fc.bias.sub_(w @ mu)
            head.fc.weight.copy_(w)


def out_of_fold_logits(heads: list[ExitHead], pooled: list[torch.Tensor], teacher: torch.Tensor,
                       labels: torch.Tensor | None, folds: int, progress: Any = None, **train: Any) -> list[torch.Tensor]:
    """Per head, every sample's logits from a copy of the head trained on the other folds
    (sample i is in fold ``i % folds``); ``heads`` themselves are not trained."""
    n = teacher.shape[0]
    fold = torch.arange(n, device=teacher.device) % folds
    out = [torch.empty(n, teacher.shape[1], device=teacher.device) for _ in heads]
    for f in range(folds):
        fit, held = fold != f, fold == f
        copies = [copy.deepcopy(h) for h in heads]
        report = None if progress is None else (
            lambda what, done, total, f=f: progress("cross-fitting exit heads", f * total + done, folds * total))
        train_heads(copies, [x[fit] for x in pooled], teacher[fit], None if labels is None else labels[fit],
                    progress=report, **train)
        with torch.no_grad():
            for k, h in enumerate(copies):
                out[k][held] = h.classify(pooled[k][held])
    return out


# -- heads for a Program -------------------------------------------------------------------------------
@dataclass
class FittedHeads:
    heads: list[ExitHead]  # trained on the whole fit split
    calibration: list[list[torch.Tensor]]  # per head, per fit batch: logits to calibrate thresholds on
    final: list[torch.Tensor]  # per fit batch: the model's own logits


def fit_heads(program: Any, cuts: list[fx.Node], logits: fx.Node, batches: list[Any], *, steps: int,
              temperature: float, seed: int, progress: Any = None) -> FittedHeads:
    """One head per cut of ``program``, distilled from the model's ``logits`` on ``batches`` (the fit split)."""
    classes = shape_of(logits)[1]
    heads = new_heads(cuts, classes)
    pooled, final = record_features(program, heads, cuts, logits, batches)
    on = final[0].device
    heads = [h.to(on) for h in heads]
    labels = labels_of(batches, classes)
    labels = None if labels is None else labels.to(on)
    features, teacher = [torch.cat(p) for p in pooled], torch.cat(final)
    train = {"steps": steps, "temperature": temperature, "seed": seed, "progress": progress}
    oof = (out_of_fold_logits(heads, features, teacher, labels, CROSS_FIT_FOLDS, **train)
           if teacher.shape[0] >= CROSS_FIT_MIN_SAMPLES else None)
    train_heads(heads, features, teacher, labels, **train)
    with torch.no_grad():
        calibrate = oof or [h.classify(x) for h, x in zip(heads, features, strict=True)]
    sizes = [z.shape[0] for z in final]
    return FittedHeads(heads, [list(z.split(sizes)) for z in calibrate], final)


def new_heads(cuts: list[fx.Node], classes: int) -> list[ExitHead]:
    """An untrained head per cut, shaped for its feature."""
    with torch.random.fork_rng(devices=[]):  # the linears' default init draws; the user's RNG stays put
        return [ExitHead(len(shape_of(c)), feature_width(shape_of(c)), classes) for c in cuts]


def record_features(program: Any, heads: list[ExitHead], cuts: list[fx.Node], logits: fx.Node,
                    batches: list[Any]) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Per head, per batch the feature at its cut pooled as the head pools it; per batch the model's
    logits. The model runs once per batch, one batch at a time."""
    pooled: list[list[torch.Tensor]] = [[] for _ in cuts]
    final: list[torch.Tensor] = []
    for values in iter_values(program, [*cuts, logits], [(b.args, b.kwargs) for b in batches]):
        for k, c in enumerate(cuts):
            pooled[k].append(heads[k].pool(values[c.name]))
        final.append(values[logits.name])
    return pooled, final


def labels_of(batches: list[Any], classes: int) -> torch.Tensor | None:
    """The batches' labels when they are class indices of the output (else the heads learn from the
    model's logits alone)."""
    if any(b.labels is None or b.labels.dim() != 1 for b in batches):
        return None
    labels = torch.cat([b.labels for b in batches]).long()
    return labels if labels.numel() and 0 <= int(labels.min()) and int(labels.max()) < classes else None
