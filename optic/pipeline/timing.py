"""Timing: the one place that times code.

The machine is shared and noisy, so candidates are never timed one after the other: they are
alternated in blocks over several rounds (each block runs one candidate ``block`` times back to
back, so thread pools settle), and the median per call with its spread (interquartile range) is
reported. Ratios come from one call to :func:`compare`, never from separate runs.

A burst of other work (or a first call that still packs weights or fills caches) shows as a wide
spread: such a measurement is taken again, within a time budget, and the tightest one kept; one
still that wide is flagged (:attr:`Timing.noisy`), and whoever prints it says it is not reliable.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import device

# Half the interquartile range beyond this fraction of the median (printed "±25%"): the machine was
# busy while it was measured, and the median is not a figure to rely on.
NOISY = 0.25


def is_noisy(spread: float) -> bool:
    """Whether a relative interquartile range (:attr:`Timing.spread`) is too wide to rely on the median."""
    return spread / 2 > NOISY


@dataclass
class Timing:
    median: float  # seconds per call
    q1: float
    q3: float
    samples: int
    attempts: int = 1  # measurements taken (more than one: the first spread too wide)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return is_noisy(self.spread)

    def __str__(self) -> str:
        text = f"{self.median * 1e3:.3f} ms ±{self.spread * 50:.0f}%"
        if self.noisy:
            text += f" (not reliable after {self.attempts} measurement(s))"
        return text


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) < 4:
        m = statistics.median(xs)
        return xs[0], m, xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[1], q[2]


def compare(fns: dict[str, Callable[[], object]], rounds: int = 5, block: int = 3, warmup: int = 2,
            budget_s: float | None = None, settle_s: float = 0.0, lead_in: int = 0) -> dict[str, Timing]:
    """Time several zero-argument callables alternated in blocks; per-call medians and quartiles.

    ``budget_s`` caps the time of one measurement: rounds stop early (after at least two) once it
    is spent. ``settle_s``: while a candidate's timings spread too wide (:attr:`Timing.noisy`), all
    of them are measured again, for up to ``settle_s`` more seconds, and the measurement whose
    widest spread is the smallest is kept (ratios stay within one measurement); ``attempts`` on
    each Timing says how many were taken. ``lead_in``: untimed calls before each block (see
    :func:`compare_models`).
    """
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        best = _measure(fns, rounds, block, budget_s, lead_in)
        attempts = 1
        deadline = time.perf_counter() + settle_s
        while is_noisy(_widest(best)) and (left := deadline - time.perf_counter()) > 0:
            again = _measure(fns, rounds, block, left if budget_s is None else min(budget_s, left), lead_in)
            attempts += 1
            if _widest(again) < _widest(best):
                best = again
    for t in best.values():
        t.attempts = attempts
    return best


def _measure(fns: dict[str, Callable[[], object]], rounds: int, block: int, budget_s: float | None,
             lead_in: int = 0) -> dict[str, Timing]:
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds):
        order = list(fns.items())
        if r % 2:
            order.reverse()  # no candidate always runs right after the same one
        for name, fn in order:
            for _ in range(lead_in):
                fn()
            samples[name].append(seconds_per_call(fn, block))
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    out = {}
    for name, xs in samples.items():
        q1, med, q3 = _quartiles(xs)
        out[name] = Timing(med, q1, q3, len(xs))
    return out


def seconds_per_call(fn: Callable[[], object], block: int) -> float:
    """Seconds per call of ``block`` calls of ``fn`` back to back (device time where CUDA is in use)."""
    if device.cuda_in_use():
        device.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(block):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / block
    t0 = time.perf_counter()
    for _ in range(block):
        fn()
    return (time.perf_counter() - t0) / block


def _widest(times: dict[str, Timing]) -> float:
    return max((t.spread for t in times.values()), default=0.0)


def calls_per_block(fn: Callable[[], object], target_s: float = 0.02, cap: int = 50) -> int:
    """How many calls make a block of about ``target_s`` seconds (at least 1)."""
    with torch.no_grad():
        fn()
        dt = seconds_per_call(fn, 1)
    return max(1, min(cap, int(target_s / max(dt, 1e-7))))


def compare_models(fns: dict[str, Callable[[], object]], budget_s: float, settle_s: float | None = None) -> dict[str, Timing]:
    """Whole-model variants (zero-argument calls, the first one the baseline) timed against each other:
    blocks of about 20 ms (sized on the first), 7 rounds at most, within ``budget_s``; measured again
    for up to ``settle_s`` more seconds (default ``budget_s``) while the timings spread too wide.

    Each block follows one untimed call. Variants run on different thread pools (PyTorch's OpenMP threads,
    TVM's), and the previous variant's idle threads spin on the cores a while after its last call: with
    blocks of one call (a model of 20 ms), every timed call of a TVM program followed a PyTorch one.
    Measured on ResNet-50 int8 at batch 1 (Zen 5, 2 cores): the TVM program timed 13.7-14.1 ms there
    against 7.8 ms alone."""
    block = calls_per_block(next(iter(fns.values())), target_s=0.02, cap=20)
    return compare(fns, rounds=7, block=block, warmup=1, budget_s=budget_s,
                   settle_s=budget_s if settle_s is None else settle_s, lead_in=1)


def rotating(fn: Callable[..., object], inputs: list[tuple[tuple, dict]]) -> Callable[[], object]:
    """A zero-argument call of ``fn`` on the next of ``inputs`` each time: models whose time depends
    on the data (early exit) are timed over real samples, not one."""
    it = itertools.cycle(inputs)

    def call() -> object:
        args, kwargs = next(it)
        return fn(*args, **kwargs)
    return call
