"""The module path of the early-exit classes in results saved before the pass was split by concern.

``optic.save`` pickles the runner, and a pickle names each class by its module: files saved then name
``optic.passes.early_exit.segments``. The classes live in :mod:`.runner` and :mod:`.heads` now.
"""

from .heads import ExitHead
from .runner import EarlyExitRunner, Segment

__all__ = ["EarlyExitRunner", "ExitHead", "Segment"]
