"""optic: a compiler-style graph optimizer for PyTorch models.

    import optic
    fast = optic.optimize(model, (x,), target="cpu")
    print(fast.report)
"""

from __future__ import annotations

# isort: off
from . import threads  # noqa: F401  (first: it limits libgomp's spinning before torch loads it; optic.threads)

# isort: on
import importlib.metadata

from . import targets  # noqa: F401
from .api import OptimizedModule, optimize
from .backend import int8  # noqa: F401  (registers optic's int8 operators: saved int8 models need them)
from .backend.artifact import load_artifact
from .backend.lower import Lowered, lower
from .budget.calibration import Budget, Labeled
from .errors import (
    CalibrationError,
    CaptureError,
    InputMismatchError,
    LoweringError,
    OpticError,
    UnknownOptionError,
    UnknownPassError,
    UnknownTargetError,
    VerificationError,
)
from .ir.capture import capture
from .ir.program import Program
from .pipeline.report import PassRecord, Report
from .saving import load, save

try:  # the installed distribution's (pyproject.toml's); a checkout used without installing has none
    __version__ = importlib.metadata.version("optic")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0.1.0"  # keep equal to pyproject.toml's version (tests/test_packaging.py checks)

__all__ = [
    "load_artifact",
    "Budget", "CalibrationError", "CaptureError", "Labeled", "InputMismatchError", "Lowered", "LoweringError", "OpticError", "OptimizedModule", "PassRecord", "Program", "Report",
    "UnknownOptionError", "UnknownPassError", "UnknownTargetError", "VerificationError", "capture", "load", "lower", "optimize", "save",
    "targets",
]
