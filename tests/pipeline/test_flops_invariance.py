"""The FLOPs the report prints change only where a pass changes the arithmetic.

Every exact pass runs in the pipeline (its numerical check and its records, as ``optimize`` runs
it) over generated models and the zoo's small ones, in the order of the presets: ``cpu_tactics``
under a stand-in clock on which oneDNN's kernels always win (so that they are kept, and counted),
``tvm_kernels`` keeping every generated kernel. Then, per pass:

- every op it emits is one the cost model counts;
- passes that run the same arithmetic another way (other kernels, another layout, one fused op
  for several) keep the count: ``cpu_tactics``, ``tvm_kernels``, and ``fuse`` when it only fuses;
- passes that remove arithmetic (``cleanup``'s constant folding, ``fold_norm``'s BN folding,
  ``fuse``'s merge of two linears into one) never raise the count, and lower it by exactly what
  the ops they removed cost less what the ops they added cost (the ops they kept cost the same).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis_profiles import examples
from strategies import cnn_models, mlp_models, token_models

import optic
from benchmarks.zoo import get as zoo_model
from optic import ir, pipeline
from optic.pipeline import cost, registry, timing
from optic.pipeline.report import Report

TOL = 1e-4
SAME_ARITHMETIC = {"cpu_tactics", "tvm_kernels"}
REMOVES_ARITHMETIC = {"cleanup", "fold_norm"}
# attention_to_sdpa: SDPA scales the scores, a model may scale Q instead (Lq·d against Lq·Lk
# multiplies), and a boolean keep-mask may need one more negation: a few elementwise FLOPs move
ATTENTION_SLACK = 0.02


class OneDNNAlwaysWins:
    """Stand-in for optic.pipeline.timing under which every oneDNN kernel and layout variant measures faster."""

    @staticmethod
    def _timing(median: float) -> timing.Timing:
        return timing.Timing(median, median, median, 4)

    def compare(self, fns, *args, **kwargs):
        return {name: self._timing(1e-3 if name == "torch" else 0.5e-3) for name in fns}

    def compare_models(self, fns, budget_s):
        return {name: self._timing(1e-3 - 0.3e-3 * ("oneDNN" in name) - 0.1e-3 * ("channels-last" in name))
                for name in fns}


@pytest.fixture
def onednn_wins(monkeypatch):
    fake = OneDNNAlwaysWins()
    monkeypatch.setattr(timing, "compare", fake.compare)
    monkeypatch.setattr(timing, "compare_models", fake.compare_models)


class Before:
    """Keeps each pass's record with the programs before and after it."""

    def __init__(self):
        self.runs = []

    def after_pass(self, record, before, after):
        self.runs.append((record, before, after))


def _costs(program) -> dict[str, float]:
    gm = program.gm
    return {n.name: float(c.flops) for n in gm.graph.nodes if (c := cost.node_cost(n, gm)) is not None}


def _emitted_uncounted(before, after) -> list[str]:
    """Nodes computing float tensors from the graph's values that ``after`` has, ``before`` has not, and the
    cost model does not count (a node reading no value, such as a module holding a packed weight, is a
    constant)."""
    old = {n.name for n in before.gm.graph.nodes}
    gm = after.gm
    return [f"{n.name} ({getattr(n.target, '__name__', n.target)})" for n in gm.graph.nodes
            if n.op.startswith("call") and n.name not in old and n.all_input_nodes
            and ir.dtype(n) is not None and ir.dtype(n).is_floating_point and cost.node_cost(n, gm) is None]


def check_flops_kept(rec, before, after) -> None:
    if rec.skipped or rec.rolled_back or not rec.changed:
        assert rec.flops_after == rec.flops_before, rec.name
        return
    name, fb, fa = rec.name, rec.flops_before, rec.flops_after
    assert fb == pytest.approx(float(cost.total_flops(before))) and fa == pytest.approx(float(cost.total_flops(after)))
    assert not _emitted_uncounted(before, after), f"{name} emitted ops the cost model does not count: " \
        f"{_emitted_uncounted(before, after)}"
    cb, ca = _costs(before), _costs(after)
    kept = set(cb) & set(ca)
    changed = {n: (cb[n], ca[n]) for n in kept if cb[n] != ca[n]}
    assert not changed, f"{name} kept these nodes but their FLOPs changed: {changed}"
    removed = sum(v for n, v in cb.items() if n not in kept)
    added = sum(v for n, v in ca.items() if n not in kept)
    assert fb - fa == pytest.approx(removed - added, rel=1e-9, abs=1e-6), name
    fuses_only = name == "fuse" and not rec.matched.get("merge_linear_chain")
    if name in SAME_ARITHMETIC or fuses_only:
        slack = ATTENTION_SLACK if rec.matched.get("attention_to_sdpa") else 1e-9
        assert fa == pytest.approx(fb, rel=slack), (
            f"{name} runs the same arithmetic, yet the report's FLOPs went {fb:.0f} → {fa:.0f} "
            f"(matched {rec.matched})")
    else:
        assert name in REMOVES_ARITHMETIC or name == "fuse", f"no FLOPs rule for pass {name}"
        assert fa <= fb, f"{name} removes arithmetic, yet FLOPs grew {fb:.0f} → {fa:.0f}"


def run_exact_passes(model, inputs, capture, passes, options=None):
    program = optic.capture(model, inputs, method=capture)
    watch = Before()
    ctx = pipeline.PassContext(target=optic.targets.get("cpu"), tolerance=TOL, measure=True,
                               check_inputs=[(program.example_args, program.example_kwargs)],
                               options=dict(options or {}), instruments=[watch])
    report = Report(type(model).__name__, "cpu", program.capture)
    pipeline.run(program, registry.resolve(passes), ctx, report)
    return watch.runs


EXACT = registry.PRESETS["exact"]


@pytest.mark.usefixtures("onednn_wins")
@examples(4, suppress_health_check=list(HealthCheck))
@given(data=st.data(), capture=st.sampled_from(["fx", "export"]))
@pytest.mark.parametrize("models", [cnn_models, mlp_models, token_models], ids=["cnn", "mlp", "tokens"])
def test_generated_models_keep_their_flops_through_every_exact_pass(models, data, capture):
    model, inputs = data.draw(models())
    for rec, before, after in run_exact_passes(model, inputs, capture, EXACT):
        check_flops_kept(rec, before, after)


@pytest.mark.usefixtures("onednn_wins")
@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_transformer"])
def test_zoo_models_keep_their_flops_through_every_exact_pass(name):
    entry = zoo_model(name)
    runs = run_exact_passes(entry.factory(), entry.inputs(2), entry.capture, EXACT)
    for rec, before, after in runs:
        check_flops_kept(rec, before, after)
    if name == "tiny_cnn":  # the stand-in clock made oneDNN win: its kernels are what was counted
        tactics = next(rec for rec, _, _ in runs if rec.name == "cpu_tactics")
        assert tactics.changed and any(r.startswith("onednn_conv") for r in tactics.matched), tactics.matched


class TwoKernels(nn.Module):
    """conv + bias + residual + relu, linear + bias + gelu: every epilogue a generated kernel fuses."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 8)

    def forward(self, x):
        y = torch.relu(self.conv(x) + x)
        return F.gelu(self.fc(y.flatten(1)))


def test_generated_kernels_keep_the_flops_of_the_layers_they_replace(tmp_path):
    pytest.importorskip("tvm")
    options = {"tune": "none", "tuning_db": tmp_path / "t.db", "tvm_keep": "all"}
    runs = run_exact_passes(TwoKernels().eval(), (torch.randn(2, 4, 4, 4),), "fx", ["tvm_kernels"], options)
    rec, before, after = runs[-1]
    assert rec.name == "tvm_kernels" and rec.changed
    assert sum(str(n.target).startswith("tvm_kernel") for n in after.gm.graph.nodes) == 2  # both layers, counted
    check_flops_kept(rec, before, after)
