"""benchmarks.int8's accounting of optic's int8 result: layers kept (smoothed, bias-corrected), layers left in
float32 with why, and which whole-model implementation the CPU step kept. A fabricated report: this checks the
bookkeeping, not any model."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks import int8 as bench
from optic.pipeline.report import PassRecord


def _report():
    acts = [
        {"pass": "quantize", "layer": "a", "status": "kept", "bias_corrected": True},
        {"pass": "quantize", "layer": "b", "status": "over budget"},  # plain b, not chosen
        {"pass": "quantize", "layer": "b", "status": "kept", "smoothing_alpha": 0.5, "bias_corrected": False},
        {"pass": "quantize", "layer": "c", "status": "dropped at the held-out check", "bias_corrected": True},
        {"pass": "lowrank", "layer": "d", "status": "kept"},
    ]
    step = PassRecord("cpu_tactics", exact=True, measured={"kept": "whole graph packaged", "variants_ms": {
        "torch ops": 60.0, "whole graph packaged": 41.5}})
    return SimpleNamespace(budget={"actions": acts}, passes=[PassRecord("quantize", exact=False), step])


def _markdown(counts: dict) -> str:
    """The zoo table of one row holding ``counts`` (no timings)."""
    row = {"model": "m", "batch": 1, "latency_ms": {}, "spread": {}, "speedup_vs_eager": {}, "agreement_with_eager": {},
           **counts}
    return bench.markdown_zoo({"rows": [row], "max_drop": 0.01, "torch": "x", "isa": []})


def test_int8_layers_counts_kept_smoothed_and_corrected_and_names_the_kept_implementation():
    got = bench._int8_layers(_report())
    assert got["optic_int8_layers"] == 2 and got["optic_int8_smoothed"] == 1 and got["optic_int8_bias_corrected"] == 1
    # b was kept smoothed: only c stayed float32
    assert got["optic_int8_stayed_fp32"] == [{"layer": "c", "why": "dropped at the held-out check"}]
    assert got["optic_int8_kept"] == "whole graph packaged" and got["optic_int8_variants_ms"]["torch ops"] == 60.0
    md = _markdown(got)
    assert 'runs as "whole graph packaged"' in md and "whole graph packaged 41.5 ms" in md
    assert "1 int8 layers bias-corrected" in md and "dropped at the held-out check: 1 (c)" in md


def test_a_report_without_the_cpu_step_says_nothing_about_the_implementation():
    rep = _report()
    rep.passes = rep.passes[:1]
    got = bench._int8_layers(rep)
    assert got["optic_int8_kept"] is None
    assert "runs as" not in _markdown(got)
