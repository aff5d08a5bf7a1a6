"""The deep profile runs proportionally more examples of every property test, not what a test fixed."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis_profiles import CI_EXAMPLES, examples

TESTS = Path(__file__).parent


def test_example_counts_scale_with_the_profile_and_keep_its_other_settings():
    ci, deep = settings.get_profile("ci"), settings.get_profile("deep")
    assert (ci.max_examples, deep.max_examples) == (CI_EXAMPLES, 400)  # what the docs promise
    assert examples(6, ci).max_examples == 6 and examples(6, ci).derandomize
    derived = examples(6, deep, suppress_health_check=list(HealthCheck))
    assert derived.max_examples == 96 and not derived.derandomize and derived.deadline is None
    assert set(derived.suppress_health_check) == set(HealthCheck)
    assert examples(CI_EXAMPLES, deep).max_examples == deep.max_examples
    assert examples(1, examples(5, ci)).max_examples == 1  # a profile of 5: 1/25 of it rounds up to one, not zero


def test_the_active_profile_is_the_default():
    assert examples(12).max_examples == round(12 * settings.default.max_examples / CI_EXAMPLES)


def test_no_test_fixes_its_own_example_count_or_randomness():
    # A literal count (or derandomize) in a test's @settings wins over every profile: deep would not go deeper.
    fixed = re.compile(r"\b(max_examples|derandomize)\s*=(?!=)")
    offenders = [f"{path.name}:{i}: {line.strip()}" for path in sorted(TESTS.rglob("*.py"))
                 if path.name != "hypothesis_profiles.py"
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1) if fixed.search(line)]
    assert not offenders, "use @examples(n) from hypothesis_profiles instead:\n" + "\n".join(offenders)
