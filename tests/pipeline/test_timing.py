"""Timing on a busy machine: a wide spread is measured again, and a figure still that wide says so.

A stand-in clock replaces ``optic.pipeline.timing``'s: the timed functions advance it by the durations of a
schedule (a burst of other work is a run of very uneven durations), so what the measurement sees
is known exactly and nothing here depends on how busy the test machine is.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import optic
from optic.pipeline import timing
from optic.pipeline.report import Report

MS = 1e-3


class Clock:
    """``optic.pipeline.timing``'s clock: each timed call moves it on by the next duration of its function's schedule."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def function(self, durations):
        it = iter(durations)

        def call():
            self.now += next(it)
        return call


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=c.perf_counter))
    return c


def busy(calls: int):
    """``calls`` durations of a busy machine (1 ms and 9 ms in turn, and a 40 ms stall now and then),
    then a quiet 1 ms forever."""
    burst = [40 * MS if i % 7 == 3 else (9 * MS if i % 2 else 1 * MS) for i in range(calls)]
    return itertools.chain(burst, itertools.repeat(1 * MS))


def test_a_wide_spread_is_measured_again_and_the_quiet_measurement_kept(clock):
    fns = {"a": clock.function(busy(7)), "b": clock.function(busy(7))}  # the warm-up call and the first 6 rounds
    t = timing.compare(fns, rounds=6, block=1, warmup=1, settle_s=1.0)
    assert all(x.attempts == 2 for x in t.values())
    assert not any(x.noisy for x in t.values())
    assert t["a"].median == pytest.approx(1 * MS) and "not reliable" not in str(t["a"])


def test_a_spread_that_stays_wide_is_flagged_and_the_retries_stay_within_their_budget(clock):
    fns = {"a": clock.function(busy(10**6)), "b": clock.function(itertools.repeat(1 * MS))}
    first = timing.compare(dict(fns), rounds=6, block=1, warmup=0)  # no settling: one measurement
    assert first["a"].attempts == 1 and first["a"].noisy
    one = clock.now
    start = clock.now
    t = timing.compare(fns, rounds=6, block=1, warmup=0, settle_s=0.5)
    assert t["a"].attempts > 2 and t["a"].noisy and not t["b"].noisy
    # the first measurement, then retries until 0.5 s are spent: each retry runs at least two rounds past it
    assert clock.now - start <= one + 0.5 + 2 * (40 + 1) * MS
    assert "not reliable" in str(t["a"]) and f"after {t['a'].attempts} measurement" in str(t["a"])


def test_compare_models_settles_within_its_budget_by_default(clock):
    fns = {"original": clock.function(busy(10**6)), "optimized": clock.function(busy(10**6))}
    t = timing.compare_models(fns, budget_s=0.3)
    assert t["original"].attempts > 1 and t["original"].noisy
    assert clock.now <= 2 * 0.3 + 2 * 2 * 20 * 40 * MS  # two budgets, and at most two rounds past each


def _report(before: timing.Timing, after: timing.Timing) -> Report:
    r = Report("M", "cpu", "fx")
    r.record_measured_latency(before, after)
    return r


def test_the_report_claims_a_speed_up_only_from_reliable_timings():
    quiet = _report(timing.Timing(2 * MS, 1.9 * MS, 2.1 * MS, 7), timing.Timing(1 * MS, 0.95 * MS, 1.05 * MS, 7))
    assert quiet.measured_reliable and "2.00× speed-up" in quiet.table() and "±5%" in quiet.table()
    noisy = _report(timing.Timing(10 * MS, 2 * MS, 55 * MS, 7, attempts=3), timing.Timing(1 * MS, 0.9 * MS, 1.1 * MS, 7))
    text = noisy.table()
    assert not noisy.measured_reliable
    assert "NOT RELIABLE" in text and "±265%" in text and "after 3 measurement(s)" in text
    assert "speed-up)" not in text and "no speed-up is claimed" in text


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.fc(x))


def test_optimize_on_a_busy_machine_measures_again_and_says_the_latency_is_not_reliable(monkeypatch):
    """The final check of optimize times the captured against the optimized model on the stand-in clock: every
    read of it is another few ms, at random, so that the spread never narrows."""
    steps = itertools.cycle([1 * MS, 9 * MS, 1 * MS, 40 * MS, 2 * MS, 9 * MS, 1 * MS])
    clock = SimpleNamespace(now=0.0)

    def perf_counter():
        clock.now += next(steps)
        return clock.now

    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=perf_counter))
    out = optic.optimize(DropoutNet().eval(), (torch.randn(4, 8),), passes=["cleanup"], measure=True,
                         options={"final_measure_s": 0.3})
    report = out.report
    assert report.pass_record("cleanup").changed  # the dropout went: the two models were timed
    assert report.measured_attempts > 1 and not report.measured_reliable
    assert "NOT RELIABLE" in report.table() and "speed-up)" not in report.table()
