"""After int8, the pipeline measures how far float rounding moved anywhere in the model moves its outputs
(the slack later exact steps are checked with): for models fed floats and models fed token ids alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from optic import targets
from optic.budget.allocator import build
from optic.budget.calibration import Budget, split
from optic.ir.capture import capture
from optic.passes import quantize as q
from optic.pipeline.registry import get
from optic.pipeline.report import Report
from optic.pipeline.runner import PassContext, _widen_for_rounding
from optic.pipeline.verify import run_seeded

pytestmark = pytest.mark.skipif(q.int8_supported(targets.get("cpu").isa) is not None,
                                reason="this CPU has no VNNI/AMX: the quantize pass declines")


class Tokens(nn.Module):
    """Token ids in: the first floating-point value is made inside the model (an embedding)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 64)
        self.layers = nn.ModuleList(nn.Linear(64 if i == 0 else 256, 256) for i in range(6))
        self.head = nn.Linear(256, 8)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class Deep(nn.Module):
    """24 residual blocks in float: float rounding moved at every op adds up past the tolerance's half."""

    def __init__(self, blocks: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(100, 64)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)) for _ in range(blocks))
        self.head = nn.Linear(64, 8)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def _slack(model: nn.Module, example: torch.Tensor, quantized: bool, sample) -> tuple[float, Report]:
    prog = capture(model, (example,), method="fx")
    cal = split([sample() for _ in range(4)], Budget(), single_input=True, batch_size=example.shape[0])
    ctx = PassContext(target=targets.get("cpu"), measure=True, calibration=cal, options={"quantize_min_macs": 0},
                      check_inputs=[((sample(),), {}) for _ in range(2)])
    if quantized:
        prog = build(prog, q.one_per_layer(get("quantize").candidates(prog, ctx), smoothed=False))
        assert any(n.target in q.int8.OUT_ARGS for n in prog.gm.graph.nodes)
    ctx.reference = [run_seeded(prog, a, k) for a, k in ctx.check_inputs]
    report = Report(model="m", target="cpu", capture="fx")
    _widen_for_rounding(prog, ctx, report)
    return ctx.tolerance, report


def test_an_int8_model_fed_token_ids_gets_rounding_slack():
    g = torch.Generator().manual_seed(1)
    sample = lambda: torch.randint(0, 100, (8, 32), generator=g)  # noqa: E731
    tol, report = _slack(Tokens().eval(), sample(), True, sample)
    assert tol > 1e-4, "an input of integers cannot be nudged: the slack must be measured inside the model"
    assert any("rounds values to integers" in n for n in report.notes)


def test_a_float_model_keeps_its_tolerance():
    """A float-only budgeted change (low rank, pruning) has no rounding step: the exact steps after it are
    checked with the tolerance, however deep the model and however far float rounding alone moves it."""
    g = torch.Generator().manual_seed(1)
    sample = lambda: torch.randint(0, 100, (8, 32), generator=g)  # noqa: E731
    tol, report = _slack(Deep().eval(), sample(), False, sample)
    assert tol == 1e-4 and not report.notes
