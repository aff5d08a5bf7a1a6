"""The accuracy budget of lossy passes: calibration data, the metric, and the allocator.

- :mod:`.calibration` : ``Budget``, calibration data checked and split, the evaluator;
- :mod:`.allocator` : actions proposed by lossy passes, spent under the budget (greedy, with the
  exact optimum on small cases).
"""

from .allocator import *  # noqa: F403
