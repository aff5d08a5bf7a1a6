"""Errors that reach users. Each message says what was wrong and what to do about it."""

from __future__ import annotations

import difflib


class OpticError(Exception):
    """Base class of every error optic raises on purpose."""


class CaptureError(OpticError):
    """The model could not be turned into a graph by any capture path."""


# Names for "a GPU" that name no board; the closest-spelling hint would suggest "cpu" for "cuda".
_GENERIC_GPU = {"cuda", "gpu", "nvidia"}


class UnknownTargetError(OpticError, KeyError):
    """A target name that no table describes. ``gpus``: the GPU targets, suggested for "cuda" or "gpu"."""

    def __init__(self, name: str, known: list[str], gpus: list[str] | None = None):
        generic = gpus and name.strip().lower().split(":")[0] in _GENERIC_GPU
        close = [] if generic else difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        if generic:
            hint = (f" '{name}' does not say which GPU: give its model, one of {', '.join(sorted(gpus))} "
                    "(`optic targets` lists their figures).")
        msg = f"unknown target '{name}'. Known targets: {', '.join(sorted(known))}.{hint}"
        super().__init__(msg)
        self.name = name
        self.known = sorted(known)
        self.closest = close[0] if close else None

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class UnknownPassError(OpticError, KeyError):
    """A pass or preset name that the registry does not hold."""

    def __init__(self, name: str, known: list[str]):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        super().__init__(f"unknown pass or preset '{name}'. Known: {', '.join(sorted(known))}.{hint}")

    def __str__(self) -> str:
        return self.args[0]


class UnknownOptionError(OpticError, KeyError):
    """An option no pass declares, or a value its declaration does not allow."""

    def __str__(self) -> str:
        return self.args[0]


class VerificationError(OpticError):
    """The optimized model disagrees with the original beyond the tolerance."""


class CalibrationError(OpticError):
    """Calibration data optic cannot read, or that does not fit the model."""


class InputMismatchError(OpticError):
    """An optimized module was called with inputs unlike the ones it was specialized to."""


class LoweringError(OpticError):
    """Lowering to TVM cannot start: TVM is missing, the target is one TVM has no code generator
    for, or the model cannot be exported. (One op TVM cannot take never raises: it stays in PyTorch.)"""
