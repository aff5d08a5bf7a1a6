"""Dynamic shapes: one optimized module serves every batch (and the sizes the user names), checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import optic
from optic.errors import InputMismatchError, OpticError
from optic.ir import dynamic

FAST = ["cleanup", "fold_norm", "fuse", "cleanup"]  # the exact passes without the CPU step's timing


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean((2, 3)))


class NeedsBatchValue(nn.Module):
    """Branches on the batch size: export must keep that dimension static."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        if x.shape[0] == 1:
            return self.fc(x) * 2
        return self.fc(x)


class Tokens(nn.Module):
    """A token model whose sequence length is bounded by its position table (export proves seq <= 16)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.pos = nn.Parameter(torch.randn(16, 12))
        self.norm = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 7)

    def forward(self, ids, mask):
        s = ids.shape[1]
        h = self.norm(self.emb(ids) + self.pos[:s])
        h = h * mask.unsqueeze(-1)
        return self.fc(h)


def _model(cls):
    torch.manual_seed(0)
    m = cls().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    return m


def _tokens(b: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50, (b, s), generator=g), (torch.rand(b, s, generator=g) > 0.2).float()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max() / a.abs().max()) < 1e-4


def test_an_export_graph_optimized_at_batch_1_serves_other_batches():
    m = _model(ConvNet)
    r = optic.optimize(m, torch.randn(1, 3, 10, 10), capture="export", passes=FAST)
    assert r.report.capture == "export"
    assert r.report.dynamic.startswith("batch (dim 0 of x): 1..")
    for b in (8, 3, 1):
        x = torch.randn(b, 3, 10, 10)
        with torch.no_grad():
            assert _close(m(x), r(x)), b
    # the other sizes are part of what every pass is verified on: example + 2 generated + batch 3
    assert r.report.checked_inputs == 4


def test_dynamic_false_keeps_the_example_shape_and_says_how_to_ask():
    r = optic.optimize(_model(ConvNet), torch.randn(1, 3, 10, 10), capture="export", passes=FAST, dynamic=False)
    assert r.report.dynamic == ""
    with pytest.raises(InputMismatchError, match="dynamic="):
        r(torch.randn(3, 3, 10, 10))


def test_a_batch_the_model_branches_on_stays_static_with_a_note():
    m = _model(NeedsBatchValue)
    r = optic.optimize(m, torch.randn(1, 6), capture="export", passes=FAST)
    assert r.report.dynamic == ""
    assert any("stayed static" in n for n in r.report.notes)
    with torch.no_grad():
        x = torch.randn(1, 6)
        assert _close(m(x), r(x))
    with pytest.raises(InputMismatchError):
        r(torch.randn(3, 6))


def test_a_named_sequence_dimension_is_dynamic_within_the_range_export_proves():
    m = _model(Tokens)
    ids, mask = _tokens(2, 8)
    r = optic.optimize(m, (ids, mask), capture="export", passes=FAST,
                       dynamic={"ids": {1: "seq"}, "mask": {1: torch.export.Dim("seq")}})
    assert "seq (dim 1 of ids, dim 1 of mask): 1..16" in r.report.dynamic
    for b, s in ((2, 5), (3, 16), (1, 1), (4, 8)):
        ids, mask = _tokens(b, s, seed=b * 10 + s)
        with torch.no_grad():
            assert _close(m(ids, mask), r(ids, mask)), (b, s)
    with pytest.raises(InputMismatchError, match="1..16"):
        r(*_tokens(1, 17))
    with pytest.raises(InputMismatchError, match="inputs that share it must agree"):
        r(_tokens(2, 5)[0], _tokens(2, 6)[1])


def test_a_bad_dynamic_request_is_a_clear_error():
    m, x = _model(ConvNet), torch.randn(2, 3, 10, 10)
    with pytest.raises(OpticError, match="does not pass"):
        optic.optimize(m, x, capture="export", passes=FAST, dynamic={"y": {0: "b"}})
    with pytest.raises(OpticError, match="no dimension 7"):
        optic.optimize(m, x, capture="export", passes=FAST, dynamic={"x": {7: "b"}})
    with pytest.raises(OpticError, match="dynamic must be"):
        optic.optimize(m, x, passes=FAST, dynamic="sometimes")


class SpecializeBatch:
    """A deliberately wrong 'exact' pass: computes the first sample's result for every sample (right at the
    example's batch of 1, wrong at any other)."""

    name = "specialize_batch"
    exact = True
    description = "test-only"

    def run(self, program, ctx):
        graph = program.gm.graph
        out = next(n for n in graph.nodes if n.op == "output")
        (res,) = out.args
        with graph.inserting_before(out):
            first = graph.call_function(torch.ops.aten.slice.Tensor, (res, 0, 0, 1))
            again = graph.call_function(torch.ops.aten.expand_as.default, (first, res))
        out.args = (again,)
        program.recompile()
        return True


@pytest.mark.parametrize("capture", ["export", "fx"])
def test_a_pass_that_bakes_in_the_example_batch_is_rolled_back(capture):
    m = _model(ConvNet)
    r = optic.optimize(m, torch.randn(1, 3, 10, 10), capture=capture, passes=["cleanup", SpecializeBatch()])
    rec = r.report.pass_record("specialize_batch")
    assert rec.rolled_back, rec
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        assert _close(m(x), r(x))


def test_an_fx_graph_that_only_runs_at_the_example_batch_checks_no_other_size():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x.reshape(1, -1))  # batch 1 only: another batch gives the linear a wrong width

    r = optic.optimize(_model(Flat), torch.randn(1, 3, 4), capture="fx", passes=FAST)
    assert r.report.dynamic == "" and r.report.checked_inputs == 3


def test_resized_sizes_stay_in_range_and_cover_the_smallest():
    dims = dynamic.Dims({0: {0: ("batch", 1, None), 1: ("seq", 1, 16)}, 1: {1: ("seq", 1, 16)}})
    leaves = [torch.zeros(1, 16), torch.zeros(5, 16)]
    sizes = dynamic.resized(leaves, dims)
    assert sizes[0] == {0: {0: 3, 1: 15}, 1: {1: 15}}  # 16 + 1 is out of range: one below
    assert sizes[1] == {0: {1: 1}, 1: {1: 1}}  # the batch is already 1
    args, _ = dynamic.resize_inputs((torch.arange(4.0).reshape(1, 4),), {}, {0: {0: 3}})
    assert args[0].shape == (3, 4)
