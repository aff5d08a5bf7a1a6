"""cleanup: no-op removal, constant folding (and when it must not fold), dead code."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import op_kinds, run_exact

from optic.ir.capture import capture as capture_program

CAPTURES = ["fx", "export"]


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        y = self.ident(self.drop(self.fc(x)))
        y = torch.nn.functional.dropout(y, 0.2, training=False)
        return y.to(torch.float32)


@pytest.mark.parametrize("capture", CAPTURES)
def test_noops_are_removed(capture):
    opt = run_exact(Noops().eval(), (torch.randn(2, 4),), capture, passes=["cleanup"])
    assert op_kinds(opt.program.gm) == ["linear"]


class ConstantMask(nn.Module):
    """A mask and position table built from buffers and fixed shapes, as HF models do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("pos", torch.arange(8).float())

    def forward(self, x):
        mask = torch.ones(8, 8).tril().log()          # depends on nothing the caller passes
        pos = (self.pos / 8.0).sin().unsqueeze(0)
        return self.fc(x + pos) + mask.sum(0)


@pytest.mark.parametrize("capture", CAPTURES)
def test_constant_subgraphs_fold(capture):
    m = ConstantMask().eval()
    opt = run_exact(m, (torch.randn(3, 8),), capture, passes=["cleanup"])
    if capture == "export":  # fx tracing already evaluates what does not touch a proxy
        assert opt.report.matched("constant_fold") >= 1
    kinds = op_kinds(opt.program.gm)
    assert "sin" not in kinds and "tril" not in kinds and "ones" not in kinds
    assert kinds.count("add") == 2 and "linear" in kinds


class Growth(nn.Module):
    """An expand of a weight that another op still reads would duplicate it: must not fold."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(512, 256))

    def forward(self, x):
        big = self.w.unsqueeze(0).expand(4, 512, 256).contiguous()
        return torch.bmm(x, big.transpose(1, 2)).sum() + (x @ self.w.t()).sum()


def test_folding_that_grows_the_model_declines():
    opt = run_exact(Growth(), (torch.randn(4, 2, 256),), "fx", passes=["cleanup"])
    assert opt.report.params[1] <= opt.report.params[0]
    assert any("larger" in d["reason"] for d in opt.report.declines("constant_fold"))


def test_fx_graphs_stay_shape_generic():
    class M(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1) * 2

    opt = run_exact(M(), (torch.randn(2, 3, 4),), "fx", passes=["cleanup"])
    torch.testing.assert_close(opt(torch.ones(5, 3, 4)), torch.full((5, 12), 2.0))


def test_random_ops_are_never_folded():
    class M(nn.Module):
        def forward(self, x):
            return x + torch.randn(3)

    import optic

    o = optic.optimize(M(), (torch.randn(2, 3),), passes=["cleanup"], measure=False)
    assert o.report.matched("constant_fold") == 0


# -- before / expected ------------------------------------------------------------------------------
def _declined_nodes_exist(opt, model, inputs, capture):
    """Every decline of the run names a node of the captured graph (never a placeholder like "*")."""
    names = {n.name for n in capture_program(model, inputs, method=capture).gm.graph.nodes}
    declines = opt.report.declines()
    assert declines and all(d["node"] in names for d in declines), declines
    return {d["node"]: d for d in declines}


@pytest.mark.parametrize("capture,before,noops", [
    ("fx", ["linear", "dropout", "identity", "dropout", "cast"], 4),
    ("export", ["linear", "dropout", "dropout", "_assert_tensor_metadata.default", "cast"], 3),
])
def test_before_expected_noops_and_metadata_asserts(capture, before, noops):
    m, x = Noops().eval(), (torch.randn(2, 4),)
    assert op_kinds(capture_program(m, x, method=capture).gm) == before
    opt = run_exact(m, x, capture, passes=["cleanup"])
    assert op_kinds(opt.program.gm) == ["linear"]
    assert opt.report.matched("remove_noop") == noops
    assert opt.report.matched("metadata_assert") == before.count("_assert_tensor_metadata.default")


def test_before_expected_constant_subgraphs_of_an_exported_graph():
    m, x = ConstantMask().eval(), (torch.randn(3, 8),)
    assert op_kinds(capture_program(m, x, method="export").gm) == [
        "ones.default", "tril.default", "log.default", "div", "sin.default", "unsqueeze", "add", "linear",
        "sum.dim_IntList", "add"]
    opt = run_exact(m, x, "export", passes=["cleanup"])
    assert op_kinds(opt.program.gm) == ["add", "linear", "add"]
    assert opt.report.matched("constant_fold") == 2  # the position table and the mask's sum


def _kinds_by_name(gm) -> dict[str, str]:
    """Each op node's name with its kind as ``op_kinds`` writes it (op_kinds lists exactly the call nodes)."""
    calls = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return dict(zip(calls, op_kinds(gm), strict=True))


@pytest.mark.parametrize("capture", CAPTURES)
def test_a_fold_that_grows_the_model_declines_at_the_node_it_would_fold(capture):
    m, x = Growth(), (torch.randn(4, 2, 256),)
    opt = run_exact(m, x, capture, passes=["cleanup"])
    declined = _declined_nodes_exist(opt, m, x, capture)
    kinds = _kinds_by_name(capture_program(m, x, method=capture).gm)
    # the frontier of the two constant subgraphs: the expanded weight's transpose and the weight's t()
    assert sorted(kinds[n].split(".")[0] for n in declined) == ["t", "transpose"]
    assert all(d["rule"] == "constant_fold" and "larger" in d["reason"] for d in declined.values())
