"""The report: what every pass did and what it measured. Printable as a table, serializable as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .timing import is_noisy


@dataclass
class PassRecord:
    name: str
    exact: bool
    changed: bool = False
    skipped: str | None = None  # why the pass did not run (disabled, not for this target)
    matched: dict[str, int] = field(default_factory=dict)  # rule -> count
    declined: list[dict[str, str]] = field(default_factory=list)  # {rule, node, reason}
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    flops_before: float = 0.0
    flops_after: float = 0.0
    max_error: float = 0.0  # relative to the output scale, against the original model
    seconds: float = 0.0
    rolled_back: bool = False
    reason: str | None = None  # why it was rolled back
    notes: list[str] = field(default_factory=list)
    measured: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        if self.rolled_back:
            return "ROLLED BACK"
        return "changed" if self.changed else "no change"


@dataclass
class Report:
    model: str
    target: str
    capture: str
    passes: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tolerance: float = 1e-4
    checked_inputs: int = 0
    final_error: float = 0.0
    nodes: tuple[int, int] = (0, 0)
    params: tuple[int, int] = (0, 0)
    flops: tuple[float, float] = (0.0, 0.0)
    latency_estimate_s: tuple[float, float] = (0.0, 0.0)
    measured_latency_s: tuple[float, float] | None = None
    # relative interquartile ranges of those two medians, and how many measurements it took
    measured_spread: tuple[float, float] | None = None
    measured_attempts: int = 1
    seconds: float = 0.0
    budget: dict[str, Any] | None = None  # the accuracy budget and what lossy passes spent (see budget_table)
    # the input dimensions one optimized module serves at any size: "batch (dim 0 of x): 1..∞"; "" static
    dynamic: str = ""

    def record_measured_latency(self, before: Any, after: Any) -> None:
        """The measured latencies (``optic.pipeline.timing.Timing``) of the captured and the optimized model."""
        self.measured_latency_s = (before.median, after.median)
        self.measured_spread = (before.spread, after.spread)
        self.measured_attempts = max(before.attempts, after.attempts)

    @property
    def measured_reliable(self) -> bool:
        """Whether the measured latencies spread narrowly enough to be figures (False: the machine was busy)."""
        return self.measured_spread is None or not any(is_noisy(s) for s in self.measured_spread)

    def pass_record(self, name: str) -> PassRecord:
        """The last record of pass ``name`` (a pass may run more than once in a pipeline)."""
        found = [p for p in self.passes if p.name == name]
        if not found:
            raise KeyError(f"no pass named '{name}' in this report; passes: {[p.name for p in self.passes]}")
        return found[-1]

    def matched(self, rule: str) -> int:
        """How many times a rule fired across all passes (kept passes only)."""
        return sum(p.matched.get(rule, 0) for p in self.passes if not p.rolled_back)

    def declines(self, rule: str | None = None) -> list[dict[str, str]]:
        return [d for p in self.passes if not p.rolled_back for d in p.declined if rule is None or d["rule"] == rule]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for rec, p in zip(d["passes"], self.passes, strict=True):
            rec["status"] = p.status
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def __str__(self) -> str:
        return self.table()

    def table(self, max_declines: int = 8) -> str:
        lines = [f"optic report: {self.model} on target '{self.target}' (captured with {self.capture})"]
        if self.dynamic:
            lines.append(f"  dynamic dimensions: {self.dynamic}")
        lines += [f"  note: {n}" for n in self.notes]
        head = f"{'#':>2} {'pass':<12} {'status':<12} {'nodes':>11} {'params':>17} {'GFLOPs':>15} {'max err':>9} {'s':>6}"
        lines += [head, "-" * len(head)]
        for i, p in enumerate(self.passes):
            if p.skipped:
                lines.append(f"{i:>2} {p.name:<12} {'skipped':<12} {p.skipped}")
                continue
            lines.append(
                f"{i:>2} {p.name:<12} {p.status:<12} {p.nodes_before:>5}→{p.nodes_after:<5} "
                f"{_si(p.params_before):>8}→{_si(p.params_after):<8} "
                f"{p.flops_before / 1e9:>7.3f}→{p.flops_after / 1e9:<7.3f} {p.max_error:>9.2e} {p.seconds:>6.2f}")
            for rule, count in p.matched.items():
                lines.append(f"{'':>6}✓ {rule}: {count}")
            for d in p.declined[:max_declines]:
                lines.append(f"{'':>6}✗ {d['rule']} declined at {d['node']}: {d['reason']}")
            if len(p.declined) > max_declines:
                lines.append(f"{'':>6}  … {len(p.declined) - max_declines} more declines (see to_json())")
            for n in p.notes:
                lines.append(f"{'':>6}· {n}")
            if p.measured.get("exits") and not p.rolled_back:
                lines += [f"{'':>6}{line}" for line in _exit_lines(p.measured)]
            if p.rolled_back:
                lines.append(f"{'':>6}↺ rolled back: {p.reason}")
        lines.append("-" * len(head))
        if self.budget:
            lines += self.budget_table().splitlines()
            lines.append("-" * len(head))
        lines.append(f"nodes {self.nodes[0]}→{self.nodes[1]}  params {_si(self.params[0])}→{_si(self.params[1])}  "
                     f"GFLOPs {self.flops[0] / 1e9:.3f}→{self.flops[1] / 1e9:.3f}")
        lines.append(f"estimated latency on {self.target}: {self.latency_estimate_s[0] * 1e3:.3f} ms → "
                     f"{self.latency_estimate_s[1] * 1e3:.3f} ms (roofline)")
        if self.measured_latency_s:
            lines.append(self.measured_line())
        lines.append(f"verified on {self.checked_inputs} input sets: max error {self.final_error:.2e} of output scale "
                     f"(tolerance {self.tolerance:g}); optimize took {self.seconds:.2f} s")
        return "\n".join(lines)

    def measured_line(self) -> str:
        """The measured latencies as the table prints them: a speed-up only when the timings are reliable."""
        a, b = self.measured_latency_s
        if self.measured_spread is None:
            return f"measured latency here: {a * 1e3:.3f} ms → {b * 1e3:.3f} ms ({a / b:.2f}× speed-up)"
        sa, sb = (f"±{s * 50:.0f}%" for s in self.measured_spread)
        if self.measured_reliable:
            return f"measured latency here: {a * 1e3:.3f} ms {sa} → {b * 1e3:.3f} ms {sb} ({a / b:.2f}× speed-up)"
        return (f"measured latency here: NOT RELIABLE, the machine was busy: {a * 1e3:.3f} ms {sa} → "
                f"{b * 1e3:.3f} ms {sb} after {self.measured_attempts} measurement(s); no speed-up is claimed "
                "(measure again on a quiet machine)")

    def budget_table(self) -> str:
        """Per layer: what each lossy pass proposed and did, predicted and measured gain, metric change."""
        b = self.budget or {}
        if not b:
            return "no accuracy budget: lossy passes did not run"
        lines = [f"accuracy budget: {b['metric']} may drop {b['max_drop']:g} "
                 f"(calibration: {b['fit_samples']} samples to fit, {b['holdout_samples']} held out)",
                 f"  original {b['base_fit']:.4f} fit / {b['base_holdout']:.4f} held-out; spent "
                 f"{b['fit_drop']:.4f} fit / {b['holdout_drop']:.4f} held-out in {b['evaluations']} evaluations"]
        rows = [r for r in b.get("actions", []) if r["status"] not in ("superseded",)]
        shown = [r for r in rows if r["status"] == "kept"] + [r for r in rows if r["status"] != "kept"]
        head = f"  {'pass':<10} {'layer':<28} {'action':<44} {'pred µs':>8} {'meas µs':>8} {'Δ alone':>8} {'status'}"
        lines.append(head)
        best_per_layer: dict[tuple, dict] = {}
        for r in shown:  # one line per layer and pass: the level kept, else the mildest one tried
            key = (r["pass"], r["layer"])
            if key not in best_per_layer:
                best_per_layer[key] = r
        for r in best_per_layer.values():
            meas = "pred." if r["predicted_only"] else (
                "" if r["measured_gain_s"] is None else f"{r['measured_gain_s'] * 1e6:.1f}")
            alone = "" if r["drop_alone"] is None else f"{r['drop_alone']:+.4f}"
            lines.append(f"  {r['pass']:<10} {str(r['layer'])[:28]:<28} {str(r['action'])[:44]:<44} "
                         f"{r['predicted_gain_s'] * 1e6:>8.1f} {meas:>8} {alone:>8} {r['status']}")
        lines += [f"  · {n}" for n in b.get("notes", [])]
        return "\n".join(lines)


def _exit_lines(m: dict[str, Any]) -> list[str]:
    """Where early exit put its heads and how many held-out samples leave at each."""
    lines = [f"⇥ exit after {e.get('module') or e.get('node')} ({e.get('cost_before', 0):.0%} of the cost before it): "
             f"threshold {e.get('threshold', 0):.3f}, {e.get('holdout_exit_rate', 0):.0%} of held-out samples leave"
             for e in m["exits"]]
    tail = f"⇥ {m.get('holdout_rate_to_end', 0):.0%} run to the end; expected {m.get('expected_speedup', 1):.2f}×"
    if "measured_speedup" in m:
        tail += f", measured {m['measured_speedup']:.2f}× at batch {m.get('measured_batch', 1)}"
    return [*lines, tail]


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
