"""Progress bars for long work, drawn only where someone watches: a terminal.

Long work in optic (budget allocation, int8 calibration, training exit heads, kernel tuning, the
benchmarks) reports through one callback shape, ``progress(what, done, total)``: ``done`` of
``total`` steps of the work named ``what``. A ``what`` of the form ``"detail; label"`` keeps one
bar named ``label`` and shows ``detail`` beside it (kernel tuning: the bar counts kernels, the
detail says which kernel and how far its measurements are).

:func:`default_progress` draws those calls as tqdm bars on stderr, one bar per label; a bar closes
when it reaches its total or when another label starts. Most loops report an item as it starts
(``done`` = the items before it), so their last report comes one short of the total: a bar closed one
short is drawn full, while one that stopped earlier (a search that ran out of budget) stays where
it stood. When stderr is not a terminal (a log file, CI, a pipe) :func:`default_progress` returns
None and nothing is drawn. ``OPTIC_PROGRESS=1`` forces the bars, ``OPTIC_PROGRESS=0`` turns them off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

from .errors import OpticError

__all__ = ["ENV", "Bars", "bars_wanted", "default_progress", "progress_callback"]

ENV = "OPTIC_PROGRESS"


def bars_wanted() -> bool:
    """Whether to draw bars: ``$OPTIC_PROGRESS`` if set, else whether stderr is a terminal."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise OpticError(f"{ENV}={value!r}: use 1 (progress bars), 0 (none), or leave it unset (bars when "
                         "stderr is a terminal).")
    if value:
        return value == "1"
    isatty = getattr(sys.stderr, "isatty", None)  # stderr is None under pythonw and some embedders
    return bool(isatty and isatty())


class Bars:
    """A ``progress(what, done, total)`` callback drawing one tqdm bar per label on ``file``
    (default: stderr, looked up when a bar starts)."""

    def __init__(self, file: TextIO | None = None):
        self.file = file
        self._bar: tqdm | None = None
        self._label: str | None = None

    def __call__(self, what: str, done: int, total: int) -> None:
        detail, _, label = what.rpartition("; ")
        if self._bar is None or label != self._label:
            self.close()
            self._bar = tqdm(total=total, desc=label, file=self.file or sys.stderr, dynamic_ncols=True, unit="")
            self._label = label
        bar = self._bar
        bar.total = total  # some work learns its length as it goes (budget allocation)
        if detail:
            bar.set_postfix_str(detail, refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            self.close()

    def write(self, text: str) -> None:
        """A line of text above the bar, which is then drawn again below it."""
        tqdm.write(text, file=self.file or sys.stderr)

    def close(self) -> None:
        """Close the open bar, if any: the work it counts is over (see the module docstring)."""
        bar, self._bar, self._label = self._bar, None, None
        if bar is not None:
            if bar.n == bar.total - 1:  # the last item was reported as it started, and has finished
                bar.update(1)
            bar.close()


def default_progress() -> Bars | None:
    """Bars on stderr when :func:`bars_wanted`, else None: no output at all."""
    return Bars() if bars_wanted() else None


def progress_callback(progress: object) -> object:
    """What ``optimize(progress=...)`` reports to: ``True`` asks for bars (:func:`default_progress`: none when
    stderr is not a terminal), a callable is used as it is, None draws nothing unless ``OPTIC_PROGRESS=1``
    asks for bars (library code prints only when its caller asks: STYLE.md)."""
    if progress is True:
        return default_progress()
    if progress is None or progress is False:
        return Bars() if os.environ.get(ENV, "").strip() == "1" else None
    if not callable(progress):
        raise OpticError(f"progress must be True (bars on a terminal), a callable progress(what, done, total), "
                         f"or None; got {progress!r}")
    return progress


class CommandProgress:
    """Progress on stderr, for a terminal or when asked (--progress; ``on``: a command's own choice): tqdm
    bars and lines above them where bars are wanted (:func:`optic.progress.bars_wanted`), else plain lines."""

    def __init__(self, args: Any, on: bool | None = None):
        """``args``: the command's arguments (``args.progress``: --progress given)."""
        asked = bool(getattr(args, "progress", False)) or sys.stderr.isatty() or bars_wanted()
        self.on = asked if on is None else on
        self.bars = default_progress() if self.on else None

    def line(self, text: str) -> None:
        if self.bars is not None:
            self.bars.write(f"optic: {text}")
        elif self.on:
            print(f"optic: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Close the open bar before the command prints its result."""
        if self.bars is not None:
            self.bars.close()

    def work(self, what: str, done: int, total: int) -> None:
        """Long work (budget allocation, training exit heads, tuning): a bar, else a line at most every 2 s."""
        if self.bars is not None:
            self.bars(what, done, total)
            return
        now = time.monotonic()
        if self.on and (now - getattr(self, "_last", 0.0) > 2.0 or done + 1 >= total):
            self._last = now
            bar = "#" * int(20 * (done + 1) / max(total, 1))
            print(f"optic: {what} [{bar:<20}] {done + 1}/{total}", file=sys.stderr, flush=True)

    def pass_done(self, rec: Any) -> None:
        self.close()  # a pass's work ends with it
        extra = f": {rec.reason}" if rec.rolled_back else ""
        self.line(f"pass {rec.name}: {rec.status} ({rec.seconds:.2f} s){extra}")
