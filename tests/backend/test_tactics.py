"""cpu_tactics: the layout rewrite is exact, choices are measured and recorded, other targets decline.

The choice tests replace the pass's clock with a script (which candidate is how fast), so that the
choice is known beforehand and the test can check that the graph holds what the report says was kept.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import optic
from optic.backend import vendor as cpu_tactics
from optic.backend.vendor import to_channels_last
from optic.pipeline import final, timing

ONEDNN = "channels-last + oneDNN kernels"
CONV_RULES = {"onednn_conv+relu": 2, "onednn_conv": 1}  # conv-relu, conv-relu, conv (the batch norm folded)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()


class ScriptedClock:
    """cpu_tactics' view of ``optic.pipeline.timing`` with the clock replaced by a script: per-layer medians for
    the torch op and the oneDNN kernel, and per-variant medians for the whole model (seconds)."""

    def __init__(self, layer: dict[str, float], models: dict[str, float]):
        self.layer, self.models, self.layer_calls = layer, models, 0

    @staticmethod
    def calls_per_block(fn, target_s: float = 0.02, cap: int = 50) -> int:
        return 1

    def compare(self, fns, **_) -> dict[str, timing.Timing]:
        self.layer_calls += 1
        return {k: timing.Timing(self.layer[k], self.layer[k], self.layer[k], 4) for k in fns}

    def compare_models(self, fns, budget_s: float) -> dict[str, timing.Timing]:
        assert next(iter(fns)) == "torch ops"  # the baseline comes first
        return {k: timing.Timing(self.models[k], self.models[k], self.models[k], 7) for k in fns}


def _optimize_with(monkeypatch, clock: ScriptedClock):
    monkeypatch.setattr(cpu_tactics, "timing", clock)
    # optimize()'s last check times the whole model for real and may return the captured graph: here it
    # measures a tie, which keeps what the pass chose
    monkeypatch.setattr(final, "compare_models", lambda fns, budget_s: {k: timing.Timing(1e-3, 1e-3, 1e-3, 7) for k in fns})
    m, x = _cnn(), torch.randn(1, 3, 16, 16)
    opt = optic.optimize(m, (x,))
    torch.testing.assert_close(opt(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())
    return opt, opt.report.pass_record("cpu_tactics")


def _targets(opt) -> list:
    return [n.target for n in opt.graph_module.graph.nodes if n.op == "call_function"]


def _channels_last_copies(opt) -> int:
    return sum(n.target is torch.ops.aten.contiguous.default and n.kwargs.get("memory_format") is torch.channels_last
               for n in opt.graph_module.graph.nodes)


def test_channels_last_rewrite_is_exact_and_keeps_outputs_contiguous():
    m = _cnn()
    x = torch.randn(2, 3, 12, 12)
    p = optic.capture(m, (x,))
    assert to_channels_last(p.gm) == 3
    out = p.gm(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-4)


def test_faster_onednn_kernels_are_kept_and_the_graph_runs_them(monkeypatch):
    clock = ScriptedClock({"torch": 2e-4, "onednn": 1e-4}, {"torch ops": 3e-3, "channels-last": 2e-3, ONEDNN: 1e-3})
    opt, rec = _optimize_with(monkeypatch, clock)
    assert rec.changed and rec.matched == {ONEDNN: 1, **CONV_RULES}
    assert clock.layer_calls == 3  # one measurement per distinct layer
    assert rec.measured["variants_ms"] == {"torch ops": 3.0, "channels-last": 2.0, ONEDNN: 1.0}
    assert rec.measured["latency_s"] == (3e-3, 1e-3)
    assert any(n.endswith(f"→ kept {ONEDNN}") for n in rec.notes)
    ops = _targets(opt)
    assert ops.count(torch.ops.mkldnn._convolution_pointwise.default) == 3
    assert torch.ops.aten.convolution.default not in ops


def test_onednn_kernels_that_are_not_faster_are_declined_with_the_measured_ratio(monkeypatch):
    clock = ScriptedClock({"torch": 1e-4, "onednn": 1.2e-4}, {"torch ops": 3e-3, "channels-last": 2e-3})
    opt, rec = _optimize_with(monkeypatch, clock)  # a third variant would be a KeyError in the script
    declined = [d for d in rec.declined if d["rule"] == "onednn_conv"]
    assert len(declined) == 3 and {d["reason"] for d in declined} == {"not faster here (1.20× the time of the torch op)"}
    assert rec.changed and rec.matched == {"channels-last": 1}
    assert any(n.endswith("→ kept channels-last") for n in rec.notes)
    assert _channels_last_copies(opt) == 3  # every conv reads a channels-last copy of its input
    assert torch.ops.mkldnn._convolution_pointwise.default not in _targets(opt)


def test_the_original_ops_stay_when_no_variant_is_faster(monkeypatch):
    clock = ScriptedClock({"torch": 2e-4, "onednn": 1e-4}, {"torch ops": 1e-3, "channels-last": 2e-3, ONEDNN: 1.5e-3})
    opt, rec = _optimize_with(monkeypatch, clock)
    assert not rec.changed and rec.matched == {}
    assert rec.measured["latency_s"] == (1e-3, 1e-3)
    assert any(n.endswith("→ kept torch ops") for n in rec.notes)
    assert _channels_last_copies(opt) == 0 and torch.ops.mkldnn._convolution_pointwise.default not in _targets(opt)


def test_a_spent_measurement_budget_keeps_the_torch_ops_and_says_why(monkeypatch):
    clock = ScriptedClock({}, {"torch ops": 1e-3, "channels-last": 2e-3})
    monkeypatch.setattr(cpu_tactics, "timing", clock)
    m, x = _cnn(), torch.randn(1, 3, 16, 16)
    rec = optic.optimize(m, (x,), options={"tactics_budget_s": -1}).report.pass_record("cpu_tactics")
    assert clock.layer_calls == 0 and not rec.changed
    assert [d["reason"] for d in rec.declined if d["rule"] == "onednn_conv"] == [
        "measurement budget spent (option tactics_budget_s)"] * 3


def test_measured_choice_on_this_machine_is_the_one_in_the_graph():
    """With the real clock the winner is unknown, but the report, the note and the graph must agree on it."""
    m, x = _cnn(), torch.randn(1, 3, 32, 32)
    opt = optic.optimize(m, (x,), options={"tactics_budget_s": 2, "tactics_confirm_s": 1})
    rec = opt.report.pass_record("cpu_tactics")
    variants = rec.measured["variants_ms"]
    best = min(variants, key=variants.get)
    assert any(n.endswith(f"→ kept {best}") for n in rec.notes)
    assert rec.measured["latency_s"] == pytest.approx((variants["torch ops"] / 1e3, variants[best] / 1e3), abs=1e-7)
    assert rec.changed == (best != "torch ops") and (best in rec.matched) == rec.changed
    in_graph = best if "returned the captured graph" not in " ".join(opt.report.notes) else "torch ops"
    assert (torch.ops.mkldnn._convolution_pointwise.default in _targets(opt)) == ("oneDNN" in in_graph)
    assert (_channels_last_copies(opt) > 0) == ("channels-last" in in_graph)
    torch.testing.assert_close(opt(x), m(x), rtol=1e-4, atol=1e-4 * m(x).abs().max().item())


def test_tactics_decline_off_host():
    m, x = _cnn(), torch.randn(1, 3, 8, 8)
    opt = optic.optimize(m, (x,), target="h100")
    assert not opt.report.pass_record("cpu_tactics").changed
    opt = optic.optimize(m, (x,), measure=False)
    assert "measurement" in opt.report.declines("cpu_tactics")[0]["reason"]


def test_channels_last_feeds_each_conv_its_rewritten_producer():
    """Each conv is rewritten in graph order and reads what replaced the conv before it: the originals are
    gone, not kept alive to feed the next one."""
    torch.manual_seed(0)
    m, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)).eval(), torch.randn(1, 3, 9, 9)
    p = optic.capture(m, (x,))
    assert to_channels_last(p.gm) == 3
    convs = [n for n in p.gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(convs) == 3 and not any(n.op == "call_module" for n in p.gm.graph.nodes)
    assert all(c.args[0].target is torch.ops.aten.contiguous.default
               and c.args[0].kwargs["memory_format"] is torch.channels_last for c in convs)
    assert [c.args[0].args[0] for c in convs[1:]] == convs[:-1]  # each conv reads the new one before it
    torch.testing.assert_close(p.gm(x), m(x), rtol=1e-4, atol=1e-4)
    assert to_channels_last(optic.capture(nn.Sequential(nn.Linear(4, 4)).eval(), (torch.randn(1, 4),)).gm) == 0


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.refl = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(self.refl(self.up(x))))
        return self.fc(y.mean((2, 3)))


def test_onednn_candidates_come_in_graph_order_and_declines_name_their_node():
    from optic.ir.rewrite import RuleStats

    p = optic.capture(Mixed().eval(), (torch.randn(1, 3, 4, 4),))
    stats = RuleStats()
    cands = cpu_tactics._candidates(p.gm, stats)
    assert [([n.name for n in c.nodes], c.attr[0]) for c in cands] == [(["conv", "relu"], "relu"), (["fc"], "none")]
    assert list(stats.declined) == [("onednn_conv", "up", cpu_tactics._CONV_ONLY),
                                    ("onednn_conv", "refl", cpu_tactics._CONV_ONLY)]


def test_where_nothing_can_be_measured_the_step_declines_for_the_whole_model():
    from types import SimpleNamespace

    from optic import targets
    from optic.ir.rewrite import MODEL, RuleStats

    p = optic.capture(_cnn(), (torch.randn(1, 3, 8, 8),))
    for target, measure, words in (("a100", True, "is not a CPU"), ("cpu", False, "measuring is off")):
        ctx = SimpleNamespace(target=targets.get(target), measure=measure, stats=RuleStats())
        assert cpu_tactics.CpuTactics().run(p, ctx) is False
        ((rule, node, reason),) = ctx.stats.declined
        assert (rule, node) == ("cpu_tactics", MODEL) and words in reason
