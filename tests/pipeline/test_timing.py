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


# -- the measurement itself -------------------------------------------------------------------------------


def test_candidates_alternate_in_blocks_and_the_order_turns_every_other_round(clock):
    calls = []

    def fn(name, seconds):
        def call():
            calls.append(name)
            clock.now += seconds
        return call

    t = timing.compare({"a": fn("a", 1 * MS), "b": fn("b", 3 * MS)}, rounds=4, block=2, warmup=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"]
    assert t["a"].median == pytest.approx(1 * MS) and t["b"].median == pytest.approx(3 * MS)  # per call, not per block
    assert t["a"].samples == t["b"].samples == 4 and t["a"].attempts == 1


def test_fewer_than_four_samples_span_from_the_fastest_to_the_slowest(clock):
    t = timing.compare({"a": clock.function([0, 1 * MS, 5 * MS, 2 * MS])}, rounds=3, block=1, warmup=1)["a"]
    assert (t.q1, t.median, t.q3, t.samples) == (pytest.approx(1 * MS), pytest.approx(2 * MS), pytest.approx(5 * MS), 3)
    assert timing.Timing(0.0, 0.0, 0.0, 3).spread == 0.0  # a zero median has no relative spread


def test_a_budget_stops_the_rounds_early_but_never_before_two(clock):
    fns = {"a": clock.function(itertools.repeat(10 * MS)), "b": clock.function(itertools.repeat(10 * MS))}
    t = timing.compare(fns, rounds=50, block=1, warmup=0, budget_s=0.05)
    assert t["a"].samples == 3  # 20 ms a round: past 50 ms after the third
    tiny = timing.compare(fns, rounds=50, block=1, warmup=0, budget_s=0.0)
    assert tiny["a"].samples == 2


def test_a_block_is_sized_from_the_second_call(clock):
    durations = [0.25, 0.125]  # the first call may still pack weights: it is not what is sized on
    assert timing.calls_per_block(clock.function(durations), target_s=0.5) == 4
    assert timing.calls_per_block(clock.function([1 * MS, 1e-9]), target_s=0.02, cap=7) == 7
    assert timing.calls_per_block(clock.function([1 * MS, 0.1]), target_s=0.02) == 1


def test_compare_models_sizes_its_blocks_on_the_baseline(clock):
    calls = {"base": 0, "other": 0}

    def fn(name, seconds):
        def call():
            calls[name] += 1
            clock.now += seconds
        return call

    t = timing.compare_models({"base": fn("base", 4 * MS), "other": fn("other", 1 * MS)}, budget_s=10.0)
    # blocks of 20 ms / 4 ms = 5 calls each, each after an untimed lead-in call, 7 rounds, after 2 sizing calls
    # of the baseline and a warm-up call each
    assert calls == {"base": 2 + 1 + 7 * 6, "other": 1 + 7 * 6}
    assert t["base"].samples == t["other"].samples == 7


def test_compare_models_does_not_time_the_first_call_after_another_variant(clock):
    """The first call after another variant's pays for that variant's spinning threads (another thread pool
    on the same cores): it is not in the figures."""
    last = {"who": None}

    def fn(name, seconds):
        def call():
            clock.now += seconds + (10 * MS if last["who"] not in (None, name) else 0)
            last["who"] = name
        return call

    t = timing.compare_models({"base": fn("base", 20 * MS), "tvm": fn("tvm", 5 * MS)}, budget_s=10.0)
    assert t["base"].median == pytest.approx(20 * MS) and t["tvm"].median == pytest.approx(5 * MS)


def test_rotating_calls_the_function_on_each_input_in_turn():
    seen = []
    call = timing.rotating(lambda *a, **k: seen.append((a, k)), [((1,), {}), ((2,), {"flag": True})])
    for _ in range(5):
        call()
    assert seen == [((1,), {}), ((2,), {"flag": True})] * 2 + [((1,), {})]
