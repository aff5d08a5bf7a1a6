"""Timing: the one place that times code.

The machine is shared and noisy, so candidates are never timed one after the other: they are
alternated in blocks over several rounds (each block runs one candidate ``block`` times back to
back, so thread pools settle), and the median per call with its spread (interquartile range) is
reported. Ratios come from one call to :func:`compare`, never from separate runs.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median: float  # seconds per call
    q1: float
    q3: float
    samples: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.median * 1e3:.3f} ms ±{self.spread * 50:.0f}%"


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) < 4:
        m = statistics.median(xs)
        return xs[0], m, xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[1], q[2]


def compare(fns: dict[str, Callable[[], object]], rounds: int = 5, block: int = 3, warmup: int = 2,
            budget_s: float | None = None) -> dict[str, Timing]:
    """Time several zero-argument callables alternated in blocks; per-call medians and quartiles.

    ``budget_s`` caps the total time: rounds stop early (after at least two) once it is spent.
    """
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in fns}
        start = time.perf_counter()
        for r in range(rounds):
            order = list(fns.items())
            if r % 2:
                order.reverse()  # no candidate always runs right after the same one
            for name, fn in order:
                t0 = time.perf_counter()
                for _ in range(block):
                    fn()
                samples[name].append((time.perf_counter() - t0) / block)
            if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
                break
    out = {}
    for name, xs in samples.items():
        q1, med, q3 = _quartiles(xs)
        out[name] = Timing(med, q1, q3, len(xs))
    return out


def calls_per_block(fn: Callable[[], object], target_s: float = 0.02, cap: int = 50) -> int:
    """How many calls make a block of about ``target_s`` seconds (at least 1)."""
    with torch.no_grad():
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return max(1, min(cap, int(target_s / max(dt, 1e-7))))


def compare_models(fns: dict[str, Callable[[], object]], budget_s: float) -> dict[str, Timing]:
    """Whole-model variants (zero-argument calls, the first one the baseline) timed against each other:
    blocks of about 20 ms (sized on the first), 7 rounds at most, within ``budget_s``."""
    block = calls_per_block(next(iter(fns.values())), target_s=0.02, cap=20)
    return compare(fns, rounds=7, block=block, warmup=1, budget_s=budget_s)


def rotating(fn: Callable[..., object], inputs: list[tuple[tuple, dict]]) -> Callable[[], object]:
    """A zero-argument call of ``fn`` on the next of ``inputs`` each time: models whose time depends
    on the data (early exit) are timed over real samples, not one."""
    it = itertools.cycle(inputs)

    def call() -> object:
        args, kwargs = next(it)
        return fn(*args, **kwargs)
    return call
