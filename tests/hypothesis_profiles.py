"""Hypothesis profiles, and the example count of each property test, derived from the active profile.

"ci": a fixed number of examples, derandomized (the same examples every run), no deadline (the
machine is shared and slow). "deep": 16 times as many examples, random, for a local bug hunt:
    HYPOTHESIS_PROFILE=deep pytest tests/passes/test_properties.py
A property test that runs fewer (or more) examples than the profile says so with ``@examples(n)``: n
under ci and the same share of any other profile's count (deep: 16 n), every other setting the active
profile's. A test that writes ``@settings(max_examples=...)`` itself would run n examples under every
profile; ``tests/test_hypothesis_profiles.py`` fails if one does.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI_EXAMPLES = 25
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, deadline=None,
                          suppress_health_check=_SLOW_IS_FINE)
# derandomize is explicit: with $CI set, hypothesis's own defaults (every profile's parent) derandomize
settings.register_profile("deep", max_examples=16 * CI_EXAMPLES, derandomize=False, deadline=None,
                          suppress_health_check=_SLOW_IS_FINE)


def load_profile() -> None:
    """Load the profile named by $HYPOTHESIS_PROFILE (default: ci)."""
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int, profile: settings | None = None, **overrides) -> settings:
    """Settings for a property test that runs ``n`` examples under the ci profile and proportionally more
    (or fewer) under ``profile`` (default: the active one), whose other settings it keeps; ``overrides``
    are further settings (e.g. ``suppress_health_check``), never the example count or randomness."""
    assert not {"max_examples", "derandomize"} & set(overrides), "the profile decides these"
    base = profile if profile is not None else settings.default
    return settings(base, max_examples=max(1, round(n * base.max_examples / CI_EXAMPLES)), **overrides)
