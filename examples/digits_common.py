"""What the digits examples share: the data and its split, training, accuracy, batch-1 latency, and a
cache of trained weights.

The 8×8 digits set (``examples/data/digits.npz``, 1,797 images, 10 classes) is split once, seeded and
stratified by class, into three disjoint parts:

- ``train`` (1,000): the examples train on it;
- ``calibration`` (397): what ``optic.optimize`` gets as ``calibration=`` (it holds out part of it itself);
- ``test`` (400): never shown to optic; the accuracy the examples report is measured here.

Pixels are scaled to [0, 1] and standardized with the mean and standard deviation of the train part.
Trained weights are cached under ``~/.cache/optic/examples/`` (``$XDG_CACHE_HOME`` is honoured), keyed
by a hash of the model's source, this file's source, the seed and the training settings, so that a
rerun skips training while a change to any of them trains again from scratch.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from optic.pipeline.timing import Timing, calls_per_block, compare, rotating

DATA = Path(__file__).parent / "data" / "digits.npz"
SIZES = {"test": 400, "calibration": 397}  # the rest (1,000) is train
SPLIT_SEED = 0
NUM_CLASSES = 10


@dataclass(frozen=True)
class Split:
    """Images ``x`` (float32 [N, 1, 8, 8], standardized) and labels ``y`` (int64 [N]); ``index``: the rows
    of digits.npz they came from."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive ``(x, y)`` batches, the form ``optic.optimize(calibration=...)`` reads."""
        return [(self.x[i:i + size], self.y[i:i + size]) for i in range(0, len(self), size)]


@dataclass(frozen=True)
class Digits:
    train: Split
    calibration: Split
    test: Split
    mean: float
    std: float


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A permutation of the rows in which every prefix holds the classes in (nearly) the proportions of
    the whole: each class is shuffled, its k-th of n samples gets the key (k + ½) / n, and rows are
    sorted by key (ties broken by a seeded random draw). Cutting this order into consecutive parts
    gives stratified, disjoint parts."""
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        key[rows] = (np.arange(len(rows)) + 0.5) / len(rows)
    tiebreak = rng.random(len(labels))
    return np.lexsort((tiebreak, key))


def load_digits(seed: int = SPLIT_SEED) -> Digits:
    """The digits set, standardized and split into train / calibration / test (see the module docstring)."""
    data = np.load(DATA)
    images, labels = data["images"].astype(np.float32) / 16.0, data["labels"].astype(np.int64)
    order = stratified_order(labels, seed)
    n_test, n_cal = SIZES["test"], SIZES["calibration"]
    parts = {"test": order[:n_test], "calibration": order[n_test:n_test + n_cal], "train": order[n_test + n_cal:]}
    train = images[parts["train"]]
    mean, std = float(train.mean()), float(train.std())

    def make(rows: np.ndarray) -> Split:
        rows = np.sort(rows)
        x = torch.from_numpy((images[rows] - mean) / std).unsqueeze(1)
        return Split(x.contiguous(), torch.from_numpy(labels[rows]), torch.from_numpy(rows))

    return Digits(make(parts["train"]), make(parts["calibration"]), make(parts["test"]), mean, std)


def shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image moved by a random whole number of pixels (up to ``max_shift``) in each direction,
    the background filling in: the one augmentation that suits centred 8×8 digits."""
    n, _, h, w = x.shape
    background = x.amin()
    padded = F.pad(x, (max_shift,) * 4, value=float(background))
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    return cropped.gather(3, cols)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    augment: bool = True
    seed: int = 0


def train(model: nn.Module, data: Digits, config: TrainConfig = TrainConfig(),
          on_epoch: Callable[[int, float, float], None] | None = None) -> nn.Module:
    """Train ``model`` on ``data.train`` with AdamW and a one-cycle learning rate; reproducible for a
    given seed (on one machine and thread count). ``on_epoch(epoch, mean_loss, seconds)`` reports
    progress. Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(data.train) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.2)
    for epoch in range(config.epochs):
        model.train()
        t0, total, seen = time.perf_counter(), 0.0, 0
        perm = torch.randperm(len(data.train), generator=gen)
        for i in range(0, len(perm), config.batch_size):
            idx = perm[i:i + config.batch_size]
            x, y = data.train.x[idx], data.train.y[idx]
            if config.augment:
                x = shift(x, gen)
            loss = F.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        if on_epoch:
            on_epoch(epoch, total / seen, time.perf_counter() - t0)
    return model.eval()


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], split: Split, batch_size: int | None = None) -> float:
    """Top-1 accuracy on ``split``. ``batch_size=1`` for a model specialized to batch 1 (an optimized
    graph captured with export, or one with early exit, which decides per input)."""
    size = batch_size or len(split)
    correct = 0
    for i in range(0, len(split), size):
        correct += int((model(split.x[i:i + size]).argmax(-1) == split.y[i:i + size]).sum())
    return correct / len(split)


def latency_batch1(eager: Callable, optimized: Callable | dict[str, Callable] | None,
                   samples: Sequence[torch.Tensor] | torch.Tensor, rounds: int = 15,
                   budget_s: float = 8.0) -> dict[str, Timing]:
    """Per-sample latency at batch 1 of ``eager`` and ``optimized`` (one model, or several by name), timed
    together in one :func:`optic.pipeline.timing.compare` call (alternated blocks of about 50 ms, medians). Each
    call takes the next of ``samples`` (one image, [1, 1, 8, 8]), so that a data-dependent model (early
    exit) is timed over real data, not on one input it happens to find easy or hard."""
    samples = [s.unsqueeze(0) if s.dim() == 3 else s for s in samples]

    calls = [((x,), {}) for x in samples]
    others = {} if optimized is None else optimized if isinstance(optimized, dict) else {"optimized": optimized}
    fns = {"eager": rotating(eager, calls), **{name: rotating(fn, calls) for name, fn in others.items()}}
    block = calls_per_block(fns["eager"], target_s=0.05, cap=100)
    return compare(fns, rounds=rounds, block=block, warmup=3, budget_s=budget_s)


@dataclass
class Outcome:
    """One model optimized within one budget, measured on the test split."""

    max_drop: float
    eager_accuracy: float
    optimized_accuracy: float
    eager: Timing
    optimized: Timing
    optimize_s: float
    report: object  # optic.Report

    @property
    def speedup(self) -> float:
        return self.eager.median / self.optimized.median

    @property
    def drop(self) -> float:
        return self.eager_accuracy - self.optimized_accuracy

    def summary(self) -> str:
        return (f"test top-1 {self.eager_accuracy:.2%} eager → {self.optimized_accuracy:.2%} optimized "
                f"(drop {self.drop * 100:+.2f} points, budget {self.max_drop:.1%})\n"
                f"batch-1 latency {self.eager} eager → {self.optimized} optimized: {self.speedup:.2f}× faster "
                f"(optimize took {self.optimize_s:.0f} s)")


def optimize_and_measure(model: nn.Module, data: Digits, example: tuple[torch.Tensor], max_drop: float,
                         calibration: list | None = None, progress: Callable[[str, int, int], None] | None = None,
                         passes: str | list = "default", **optimize_kwargs) -> tuple[nn.Module, Outcome]:
    """``optic.optimize(model, example, passes=passes, budget=Budget(max_drop), calibration=...)``,
    then top-1 on the test split (the optimized model at batch 1, the setting it was optimized and is
    timed for) and batch-1 latency against eager over the test images."""
    import optic

    t0 = time.perf_counter()
    fast = optic.optimize(model, example, target="cpu", passes=passes, budget=optic.Budget(max_drop=max_drop),
                          calibration=calibration or data.calibration.batches(), progress=progress,
                          **optimize_kwargs)
    seconds = time.perf_counter() - t0
    t = latency_batch1(model, fast, data.test.x)
    outcome = Outcome(max_drop, accuracy(model, data.test), accuracy(fast, data.test, batch_size=1), t["eager"],
                      t["optimized"], seconds, fast.report)
    return fast, outcome


class Progress:
    """Prints ``optic.optimize``'s progress: each new stage once, then every ``every``-th step."""

    def __init__(self, every: int = 10):
        self.every, self.last = every, None

    def __call__(self, what: str, done: int, total: int) -> None:
        if what != self.last or done % self.every == 0:
            print(f"  {what}: {done}/{total}", flush=True)
            self.last = what


def run_example(name: str, build: Callable[..., nn.Module], example: tuple[torch.Tensor], max_drop: float) -> Outcome:
    """The examples' ``main()``: train (or load), measure eager, optimize within ``max_drop``, print the
    report and the figures on the test split."""
    data = load_digits()
    t0 = time.perf_counter()
    model = build(verbose=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: ready in {time.perf_counter() - t0:.1f} s, {params / 1e6:.2f} M parameters, "
          f"test top-1 {accuracy(model, data.test):.2%}", flush=True)
    print(f"optimizing with passes='default', budget {max_drop:.1%} top-1 ...", flush=True)
    _, outcome = optimize_and_measure(model, data, example, max_drop, progress=Progress())
    print(outcome.report)
    print(outcome.summary())
    return outcome


# -- the cache of trained weights -------------------------------------------------------------------------
_TRAINING_CODE = (train, shift, load_digits, stratified_order)  # what the trained weights depend on
def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "optic" / "examples"


def cache_key(name: str, model_code: Sequence[object], config: TrainConfig) -> str:
    """``<name>-<hash>``: the hash covers the model's code, this file and the training settings."""
    h = hashlib.sha256()
    for obj in (*model_code, *_TRAINING_CODE):
        h.update(inspect.getsource(obj).encode())
    h.update(repr((config, SIZES, SPLIT_SEED, DATA.stat().st_size)).encode())
    return f"{name}-{h.hexdigest()[:12]}"


def trained(name: str, make: Callable[[], nn.Module], config: TrainConfig, model_code: Sequence[object],
            data: Digits | None = None, on_epoch: Callable[[int, float, float], None] | None = None,
            retrain: bool = False) -> nn.Module:
    """The model ``make()`` builds, trained with ``config``: loaded from the cache when this code and
    seed trained it before, else trained (seeded, so reproducible) and saved. Eval mode."""
    path = cache_dir() / f"{cache_key(name, model_code, config)}.pt"
    torch.manual_seed(config.seed)
    model = make()
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train(model, data or load_digits(), config, on_epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return model


def example_inputs() -> tuple[torch.Tensor]:
    """One calibration image, batch 1 (the test split is never shown to optic)."""
    return (load_digits().calibration.x[:1],)


def calibration(batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration split as ``(x, y)`` batches, for ``optic.optimize(calibration=...)``."""
    return load_digits().calibration.batches(batch_size)


def main(name: str, build: Callable[..., nn.Module], doc: str | None, argv: list[str] | None) -> Outcome:
    """An example's ``main()``: ``--retrain`` trains again; then :func:`run_example`."""
    args = parse_args(doc, argv)
    if args.retrain:
        build(retrain=True, verbose=True)
    return run_example(name, build, example_inputs(), args.max_drop)


def parse_args(doc: str | None, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.01, help="the top-1 budget (0.01: one point)")
    parser.add_argument("--retrain", action="store_true", help="train again even when cached weights exist")
    return parser.parse_args(argv)


def print_epoch(epoch: int, loss: float, seconds: float) -> None:
    print(f"  epoch {epoch + 1:3d}  loss {loss:.4f}  {seconds:.1f} s", flush=True)
