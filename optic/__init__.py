"""optic: a compiler-style graph optimizer for PyTorch models.

    import optic
    fast = optic.optimize(model, (x,), target="cpu")
    print(fast.report)
"""

from __future__ import annotations

import importlib.metadata

from . import int8, targets  # noqa: F401  (int8 registers optic's int8 operators: saved int8 models need them)
from .api import OptimizedModule, optimize
from .artifact import load_artifact
from .calibration import Budget, Labeled
from .capture import capture
from .errors import (
    CalibrationError,
    CaptureError,
    InputMismatchError,
    LoweringError,
    OpticError,
    UnknownPassError,
    UnknownTargetError,
    VerificationError,
)
from .lower import Lowered, lower
from .program import Program
from .report import PassRecord, Report
from .saving import load, save

try:  # the installed distribution's (pyproject.toml's); a checkout used without installing has none
    __version__ = importlib.metadata.version("optic")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0.1.0"  # keep equal to pyproject.toml's version (tests/test_packaging.py checks)

__all__ = [
    "load_artifact",
    "Budget", "CalibrationError", "CaptureError", "Labeled", "InputMismatchError", "Lowered", "LoweringError", "OpticError", "OptimizedModule", "PassRecord", "Program", "Report",
    "UnknownPassError", "UnknownTargetError", "VerificationError", "capture", "load", "lower", "optimize", "save",
    "targets",
]
