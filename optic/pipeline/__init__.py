"""The pipeline: passes found by name, run in order, each one checked and rolled back when it breaks.

- :mod:`.registry` : the pass protocol, the registry and the presets;
- :mod:`.runner` : the pass context and the loop that runs, checks, rolls back and records;
- :mod:`.verify`, :mod:`.timing`, :mod:`.cost`, :mod:`.health` : the numerical check, measurement
  on a noisy machine, the analytic cost model, non-finite values;
- :mod:`.final` : the checks on the whole result (never slower, numerics, the held-out budget);
- :mod:`.report` : what every pass did and measured.
"""

from .runner import *  # noqa: F403
