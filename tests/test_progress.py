"""Progress bars: drawn on a terminal (or when OPTIC_PROGRESS=1), nothing at all otherwise."""

from __future__ import annotations

import argparse
import io
import os
import sys

import pytest
import torch
import torch.nn as nn

import optic
from optic import progress
from optic.progress import Bars, default_progress


def _closed_bars(text: str) -> list[str]:
    """The last state of each closed bar: a bar redraws itself after '\\r' and ends with a newline."""
    return [line.rpartition("\r")[2] for line in text.split("\n")[:-1]]


def _terminal(monkeypatch) -> None:
    """The captured stderr says it is a terminal, OPTIC_PROGRESS unset. (Inside the test: capsys swaps
    its stream in only when the test itself runs.)"""
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def test_on_a_terminal_a_bar_is_drawn_and_ends_at_its_total(monkeypatch, capsys):
    _terminal(monkeypatch)
    bars = default_progress()
    assert bars is not None
    for done in range(6):
        bars("calibrating int8 layers", done, 5)
    (bar,) = _closed_bars(capsys.readouterr().err)
    assert bar.startswith("calibrating int8 layers: 100%") and " 5/5 " in bar


def test_not_a_terminal_means_no_progress_at_all(monkeypatch, capsys):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not sys.stderr.isatty()
    assert default_progress() is None


def test_the_environment_switches_bars_off_and_on(monkeypatch, capsys):
    _terminal(monkeypatch)
    assert isinstance(default_progress(), Bars)
    monkeypatch.setenv(progress.ENV, "0")
    assert default_progress() is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setenv(progress.ENV, "1")
    assert isinstance(default_progress(), Bars)
    monkeypatch.setenv(progress.ENV, "yes")
    with pytest.raises(optic.OpticError, match="OPTIC_PROGRESS='yes': use 1"):
        default_progress()


def test_one_bar_per_label_and_the_detail_beside_it():
    out = io.StringIO()
    bars = Bars(out)
    # kernel tuning: the detail changes with every measurement, the bar (kernels) stays one
    for measured in range(1, 4):
        bars(f"tuning matmul: {measured}/3 measured; kernels", 0, 3)
    bars("matmul: generated; kernels", 1, 3)
    bars("scoring actions", 0, 3)  # another label closes the kernels bar
    bars("scoring actions", 3, 3)
    kernels, scoring = _closed_bars(out.getvalue())
    assert kernels.startswith("kernels:  33%") and "1/3" in kernels and "matmul: generated" in kernels
    assert scoring.startswith("scoring actions: 100%") and "3/3" in scoring


def test_a_bar_closed_one_short_is_full_and_one_stopped_early_stays():
    out = io.StringIO()
    bars = Bars(out)
    for i in range(4):  # reported as each layer starts: the last report is 3 of 4
        bars("calibrating int8 layers", i, 4)
    bars("allocating budget", 1, 5)  # a search that then runs out of budget
    bars.close()
    calibrating, allocating = _closed_bars(out.getvalue())
    assert calibrating.startswith("calibrating int8 layers: 100%") and "4/4" in calibrating
    assert allocating.startswith("allocating budget:  20%") and "1/5" in allocating


def test_work_that_learns_its_length_redraws_the_total():
    out = io.StringIO()
    bars = Bars(out)
    bars("allocating budget", 1, 5)
    bars("allocating budget", 2, 3)
    bars("allocating budget", 3, 3)
    (bar,) = _closed_bars(out.getvalue())
    assert "3/3" in bar


def test_a_line_written_between_steps_keeps_the_bar_below_it():
    out = io.StringIO()
    bars = Bars(out)
    bars("training exit heads", 1, 4)
    bars.write("optic: pass fuse: changed")
    bars("training exit heads", 4, 4)
    text = out.getvalue()
    assert "optic: pass fuse: changed\n" in text
    assert text.index("optic: pass fuse: changed") < text.rindex("training exit heads: 100%")


class _RecordProgress:
    """A test-only exact pass that keeps the progress callback the pipeline hands it."""

    name = "record_progress"
    exact = True
    description = "test-only"
    seen: list = []

    def run(self, program, ctx):
        self.seen.append(ctx.progress)
        return False


@pytest.mark.parametrize("env, drawn", [("1", True), ("0", False)])
def test_optimize_draws_bars_unless_told_otherwise(monkeypatch, env, drawn):
    monkeypatch.setenv(progress.ENV, env)
    rec = _RecordProgress()
    rec.seen = []
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    optic.optimize(model, (torch.randn(2, 4),), passes=[rec], measure=False)
    assert isinstance(rec.seen[0], Bars) is drawn and (rec.seen[0] is None) is not drawn
    mine = []
    optic.optimize(model, (torch.randn(2, 4),), passes=[rec], measure=False,
                   progress=lambda *a: mine.append(a))
    assert rec.seen[1] is not None and not isinstance(rec.seen[1], Bars)  # the caller's own callback


def test_optimize_draws_bars_only_when_asked(monkeypatch):
    """STYLE.md: library code prints only when its caller asks; progress=True asks (a terminal shows bars)."""
    monkeypatch.delenv(progress.ENV, raising=False)
    _terminal(monkeypatch)
    rec = _RecordProgress()
    rec.seen = []
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    optic.optimize(model, (torch.randn(2, 4),), passes=[rec], measure=False)
    optic.optimize(model, (torch.randn(2, 4),), passes=[rec], measure=False, progress=True)
    assert rec.seen[0] is None and isinstance(rec.seen[1], Bars)
    with pytest.raises(optic.OpticError, match="progress must be"):
        optic.optimize(model, (torch.randn(2, 4),), passes=[rec], measure=False, progress="yes")


# -- the command line and the benchmarks ------------------------------------------------------------------
def test_the_cli_draws_bars_on_a_terminal_and_writes_its_lines_above_them(monkeypatch, capsys):
    from optic.progress import CommandProgress

    _terminal(monkeypatch)
    progress = CommandProgress(argparse.Namespace(progress=False))
    progress.line("loading model")
    for done in range(4):
        progress.work("training exit heads", done, 3)
    err = capsys.readouterr().err
    assert "optic: loading model\n" in err and "[####" not in err  # the bar, not the hand-drawn line
    assert _closed_bars(err)[-1].startswith("training exit heads: 100%")


def test_the_cli_keeps_plain_lines_where_asked_off_a_terminal(monkeypatch, capsys):
    from optic.progress import CommandProgress

    monkeypatch.delenv(progress.ENV, raising=False)
    quiet = CommandProgress(argparse.Namespace(progress=False))
    quiet.line("loading model")
    quiet.work("training exit heads", 2, 3)
    assert quiet.bars is None and capsys.readouterr().err == ""
    asked = CommandProgress(argparse.Namespace(progress=True))
    asked.line("loading model")
    asked.work("training exit heads", 2, 3)
    assert asked.bars is None
    assert capsys.readouterr().err == ("optic: loading model\n"
                                       "optic: training exit heads [####################] 3/3\n")


def test_the_benchmark_runner_reports_each_row_done(tmp_path, monkeypatch):
    from benchmarks import runner

    monkeypatch.setenv(runner.WARMUP_ENV, "0")
    monkeypatch.setenv("TVM_NUM_THREADS", os.environ.get("TVM_NUM_THREADS", "1"))  # run() sets it: restored
    steps, threads = [], torch.get_num_threads()
    try:
        runner.run(["tiny_cnn"], ["eager"], [1, 2], rounds=2, out_dir=tmp_path, threads=1,
                   steps=lambda *a: steps.append(a))
    finally:
        torch.set_num_threads(threads)
    assert steps == [("models x batches", 0, 2), ("models x batches", 1, 2), ("models x batches", 2, 2)]
