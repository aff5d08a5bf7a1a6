"""sparse24: which linears take a 2:4 mask on a target with sparse tensor cores (before / expected), and
the declines, each naming the linear it refuses. The mask math and the budgeted runs are tested in
tests/budget/test_budget.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import op_kinds

from optic import targets
from optic.ir.capture import capture
from optic.ir.opview import view
from optic.pipeline.registry import get
from optic.pipeline.report import PassRecord
from optic.pipeline.runner import PassContext

CAPTURES = ["fx", "export"]
X = (512, 1024)  # rows enough for the wide layer to be compute-bound on an H100


class Mlp(nn.Module):
    """A wide layer that pays, a narrow one that is memory-bound, and one whose input is not a multiple of 4."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.odd = nn.Linear(1024, 4096), nn.Linear(4096, 6), nn.Linear(6, 8)

    def forward(self, x):
        return self.odd(self.down(torch.relu(self.up(x))))


def _linears(gm) -> list:
    return [op for n in gm.graph.nodes if (op := view(n, gm)) is not None and op.kind == "linear"]


def _context(target: str) -> PassContext:
    ctx = PassContext(target=targets.get(target), measure=False)
    ctx.record = PassRecord("sparse24", False)
    return ctx


@pytest.mark.parametrize("method", CAPTURES)
def test_before_expected_the_wide_linear_is_masked_2_of_4(method):
    x = torch.randn(*X)
    prog = capture(Mlp().eval(), (x,), method=method)
    assert op_kinds(prog.gm) == ["linear", "act:relu", "linear", "linear"]
    before = [op.const("weight").clone() for op in _linears(prog.gm)]
    ctx = _context("h100")
    assert get("sparse24").run(prog, ctx) is True
    assert ctx.stats.matched == {"sparse24": 1}  # one layer made sparse, counted as the other lossy runs count
    assert op_kinds(prog.gm) == ["linear", "act:relu", "linear", "linear"]
    after = [op.const("weight") for op in _linears(prog.gm)]
    kept = after[0].ne(0).reshape(4096, 256, 4).sum(-1)
    assert kept.eq(2).all(), "every group of 4 inputs keeps 2"
    assert torch.equal(after[0], before[0] * after[0].ne(0)), "the kept weights are the original ones"
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])
    prog.recompile()
    assert prog(x).shape == (512, 8)


@pytest.mark.parametrize("method", CAPTURES)
def test_declines_name_the_linear_they_refuse(method):
    prog = capture(Mlp().eval(), (torch.randn(*X),), method=method)
    ctx = _context("h100")
    actions = get("sparse24").candidates(prog, ctx)
    up, down, odd = _linears(prog.gm)
    assert [a.group for a in actions] == [up.node.name]
    assert actions[0].describe == "2:4 sparse [4096×1024], weight magnitude"
    declined = {node: why for rule, node, why in ctx.stats.declined if rule == "sparse24"}
    assert set(declined) == {down.node.name, odd.node.name}
    assert declined[down.node.name].startswith("no predicted gain at [512×4096]·[4096×6]")
    assert "not a multiple of 4" in declined[odd.node.name]


def test_a_target_without_sparse_tensor_cores_is_a_note_for_the_whole_model_not_a_decline():
    prog = capture(Mlp().eval(), (torch.randn(*X),))
    ctx = _context("cpu")
    assert get("sparse24").run(prog, ctx) is False
    assert not ctx.stats.declined
    assert any("no sparse tensor cores" in n for n in ctx.record.notes)
