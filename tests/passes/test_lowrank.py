"""lowrank: the factor math alone (plain and activation-aware SVD, conv decomposition, the
break-even rank), then the surgery on fx and export graphs, the declines, and a property test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import op_kinds
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import cnn_models, mlp_models

from optic import targets
from optic.budget.allocator import build
from optic.budget.calibration import Budget, split
from optic.ir.capture import capture
from optic.ir.opview import view
from optic.passes import lowrank as lr
from optic.pipeline.registry import get
from optic.pipeline.runner import PassContext
from optic.pipeline.timing import Timing
from optic.pipeline.verify import compare


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def correlated(n: int, k: int, seed: int = 0, decay: float = 0.7) -> torch.Tensor:
    """``n`` samples of ``k`` features with a fast-decaying spectrum in a random basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    scales = decay ** torch.arange(k, dtype=torch.float64)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scales) @ q.T


# -- the math ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k", [(12, 20), (20, 12), (16, 16)])
@pytest.mark.parametrize("samples", [200, 5])  # 5 samples: X·Xᵀ is rank-deficient, the damping carries it
def test_full_rank_reproduces_the_weight_and_the_output(m, k, samples):
    w = torch.randn(m, k, dtype=torch.float64)
    x = correlated(samples, k)
    for basis, _ in (lr.svd_basis(w), lr.activation_basis(w, x.T @ x)):
        a, b = lr.truncate(w, basis, min(m, k))
        assert rel(a @ b, w) < 1e-5
        assert rel(x @ (a @ b).T, x @ w.T) < 1e-5
        assert torch.allclose(a.T @ a, torch.eye(a.shape[1], dtype=torch.float64), atol=1e-9)  # A is orthonormal


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    w = torch.randn(24, 32, dtype=torch.float64)
    x = correlated(500, 32)
    for rank in (4, 8, 16):
        errs = {}
        for name, (basis, _) in {"svd": lr.svd_basis(w), "act": lr.activation_basis(w, x.T @ x)}.items():
            a, b = lr.truncate(w, basis, rank)
            errs[name] = rel(x @ (a @ b).T, x @ w.T)
        assert errs["act"] < 0.8 * errs["svd"], (rank, errs)


def test_error_is_the_tail_energy():
    """Eckart–Young: plain SVD loses the tail σ² of W; activation-aware (undamped) loses the tail of
    W·L, which is the output error on the calibration inputs exactly."""
    w = torch.randn(10, 14, dtype=torch.float64)
    x = correlated(300, 14)
    basis, energy = lr.svd_basis(w)
    a, b = lr.truncate(w, basis, 4)
    assert math.isclose(float((w - a @ b).square().sum()), float(energy[4:].sum()), rel_tol=1e-9)
    basis, energy = lr.activation_basis(w, x.T @ x, damp=0.0)
    a, b = lr.truncate(w, basis, 4)
    assert math.isclose(float((x @ (w - a @ b).T).square().sum()), float(energy[4:].sum()), rel_tol=1e-7)
    assert lr.energy_kept(energy, 10) == pytest.approx(1.0)


def test_all_zero_inputs_fall_back_to_plain_svd():
    w = torch.randn(6, 8, dtype=torch.float64)
    basis, _ = lr.activation_basis(w, torch.zeros(8, 8))
    assert torch.allclose(basis.abs(), lr.svd_basis(w)[0].abs())


CONVS = [  # (nd, C, O, kernel, stride, padding, dilation)
    (2, 3, 8, 3, 1, 1, 1), (2, 4, 6, 3, 2, 1, 1), (2, 5, 7, 3, 1, 2, 2), (2, 4, 9, (3, 1), (2, 1), (1, 0), 1),
    (2, 6, 5, 1, 1, 0, 1), (2, 6, 5, 1, 2, 0, 1), (1, 4, 6, 5, 2, 2, 1)]


@pytest.mark.parametrize("nd,c,o,kernel,stride,padding,dilation", CONVS)
def test_conv_decomposition_at_full_rank_reproduces_the_conv(nd, c, o, kernel, stride, padding, dilation):
    conv = getattr(F, f"conv{nd}d")
    ks = (kernel,) * nd if isinstance(kernel, int) else kernel
    w = torch.randn(o, c, *ks, dtype=torch.float64)
    bias = torch.randn(o, dtype=torch.float64)
    x = torch.randn(2, c, *[9] * nd, dtype=torch.float64)
    ref = conv(x, w, bias, stride, padding, dilation)
    full = min(o, c * math.prod(ks))
    for basis, _ in (lr.svd_basis(w.reshape(o, -1)),):
        first, second = lr.conv_factors(w, basis, full)
        assert first.shape == (full, c, *ks) and second.shape == (o, full, *[1] * nd)
        got = conv(conv(x, first, None, stride, padding, dilation), second, bias)
        assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("stride,padding,dilation,mode", [(1, 1, 1, "zeros"), (2, 2, 2, "zeros"), (1, 1, 1, "reflect")])
def test_conv_gram_is_the_output_error_metric(stride, padding, dilation, mode):
    """tr(ΔW·G·ΔWᵀ) over unfolded patches equals ‖conv(x, ΔW)‖²: the patches are read in the order
    of W.reshape(O, -1), with the conv's stride, padding, dilation and padding mode."""
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    dw = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    g = lr.conv_gram([x], [3, 3], [stride] * 2, [padding] * 2, [dilation] * 2, mode, samples=10**6)
    xin = F.pad(x, [padding] * 4, mode=mode) if mode != "zeros" else x
    out = F.conv2d(xin, dw, None, stride, 0 if mode != "zeros" else padding, dilation)
    d2 = dw.reshape(5, -1)
    assert math.isclose(float(torch.trace(d2 @ g @ d2.T)), float(out.square().sum()), rel_tol=1e-9)


def test_break_even_on_a_gpu_declines_tiny_layers_and_pays_for_big_ones():
    a100 = targets.get("a100")
    tiny = lr.Gemm(rows=1, k=64, m=64, in_elems=64, itemsize=4, dtype="float32", bias=True)
    assert lr.break_even_rank(tiny, a100, 8) == 0  # the second launch costs more than the layer
    big = lr.Gemm(rows=1, k=4096, m=4096, in_elems=4096, itemsize=4, dtype="float32", bias=True)
    be = lr.break_even_rank(big, a100, 8)
    assert 0 < be < 4096 and be % 8 == 0
    assert big.factored_seconds(be, a100) < big.dense_seconds(a100) <= big.factored_seconds(be + 8, a100)
    ranks = lr.proposed_ranks(be, 8)
    assert ranks == sorted(ranks) and all(r % 8 == 0 and 0 < r < be for r in ranks) and len(ranks) == 6


def test_half_precision_layers_are_costed_on_targets_without_a_half_figure():
    cpu = targets.get("cpu")
    half = lr.Gemm(rows=8, k=256, m=256, in_elems=8 * 256, itemsize=2, dtype="float16", bias=True)
    assert half.factored_seconds(16, cpu) < half.dense_seconds(cpu)


# -- the surgery ------------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 10)).eval()


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2, padding=2, dilation=2),
                         nn.ReLU(), nn.Conv2d(24, 16, 1), nn.Flatten(), nn.Linear(16 * 3 * 3, 10)).eval()


def context(prog, target="cpu", calibrate=True, measure=False, **options) -> PassContext:
    cal = None
    if calibrate:
        x = prog.example_args[0]
        g = torch.Generator().manual_seed(1)
        cal = split([torch.randn(x.shape, generator=g) for _ in range(4)], Budget(), single_input=True,
                    batch_size=x.shape[0])
    return PassContext(target=targets.get(target), measure=measure, calibration=cal, options=options)


CASES = [(mlp, (4, 48)), (cnn, (2, 3, 6, 6))]


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("make,shape", CASES)
@pytest.mark.parametrize("factoring", ["activation", "svd"])
def test_full_rank_actions_reproduce_the_model(method, make, shape, factoring):
    model, x = make(), torch.randn(*shape)
    prog = capture(model, (x,), method=method)
    ctx = context(prog, lowrank_method=factoring)
    actions = get("lowrank").actions_at(prog, ctx, 1.0)
    layers = sum(k in ("linear", "conv") for k in op_kinds(prog.gm))
    assert len(actions) == layers
    want = "activation-aware SVD" if factoring == "activation" else "SVD"
    assert all(a.info["method"] == want and want in a.describe for a in actions)
    out = build(prog, actions)
    assert sum(k in ("linear", "conv") for k in op_kinds(out.gm)) == 2 * layers
    with torch.no_grad():
        c = compare(model(x), out(x), 1e-4)
    assert c.ok, str(c)
    assert all(a.info["energy_kept"] == pytest.approx(1.0) for a in actions)
    assert prog.param_count() == sum(p.numel() for p in model.parameters())  # the base is untouched
    prov = [n.meta["optic"] for n in out.gm.graph.nodes if n.meta.get("optic", {}).get("pass") == "lowrank"]
    assert len(prov) == 2 * layers and all(p["origin"] for p in prov)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_low_rank_changes_the_param_count_as_predicted(method):
    model = nn.Sequential(nn.Linear(256, 192), nn.ReLU(), nn.Linear(192, 8)).eval()
    x = torch.randn(2, 256)
    prog = capture(model, (x,), method=method)
    ctx = context(prog)
    actions = get("lowrank").candidates(prog, ctx)
    assert actions and {a.group for a in actions} == {next(iter(a.nodes)) for a in actions}
    step = lr.lanes(ctx.target)
    before = prog.param_count()
    for a in actions:
        r = a.info["rank"]
        assert r % step == 0 and r < a.info["break_even_rank"] + 1 and a.predicted_gain_s > 0
        out = build(prog, [a])
        assert out.param_count() == before - 256 * 192 + r * (256 + 192)
        assert a.level == pytest.approx(1 - r * (256 + 192) / (256 * 192))
        assert a.describe == f"rank {r} of 192 (activation-aware SVD)" and 0 < a.info["energy_kept"] < 1
        assert a.layer == "0"
        assert out(x).shape == (2, 8)
    levels = [a.level for a in actions]
    assert levels == sorted(levels, reverse=True) and len(set(levels)) == len(levels)  # ranks ascend
    declined = {n: why for _, n, why in ctx.stats.declined}
    assert any("tiny layer" in why for why in declined.values())  # the 8-wide head


def test_an_action_reads_the_weights_of_the_program_it_is_given():
    torch.manual_seed(1)
    m1, m2 = mlp(), mlp()
    x = torch.randn(4, 48)
    p1, p2 = capture(m1, (x,)), capture(m2, (x,))
    actions = get("lowrank").actions_at(p1, context(p1, calibrate=False), 1.0)
    out = build(p2, actions)
    with torch.no_grad():
        assert compare(m2(x), out(x), 1e-4).ok


def test_one_svd_per_layer_whatever_the_levels_and_rebuilds(monkeypatch):
    calls = []
    real = lr.svd_basis
    monkeypatch.setattr(lr, "svd_basis", lambda w: calls.append(w.shape) or real(w))
    model = nn.Sequential(nn.Linear(256, 192)).eval()
    prog = capture(model, (torch.randn(2, 256),))
    actions = get("lowrank").candidates(prog, context(prog))
    assert len(actions) > 2
    for a in actions:
        build(prog, [a])
        build(prog, [a])
    assert len(calls) == 1


class Refused(nn.Module):
    """A grouped conv, a transposed conv and a linear read twice (tied): none of them factors."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 16, 3, groups=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.up(self.grouped(x)).permute(0, 2, 3, 1)
        return self.fc(torch.relu(self.fc(y)))  # the same weight read twice


@pytest.mark.parametrize("method", ["fx", "export"])
def test_declines_grouped_transposed_and_shared_weights(method):
    prog = capture(Refused().eval(), (torch.randn(1, 8, 4, 4),), method=method)
    ctx = context(prog, lowrank_keep=1.0)
    assert get("lowrank").candidates(prog, ctx) == []
    reasons = [why for rule, _, why in ctx.stats.declined if rule == "lowrank"]
    assert sum("grouped convolution (groups=2)" in r for r in reasons) == 1
    assert sum("transposed convolution" in r for r in reasons) == 1
    assert sum("shared with another op" in r for r in reasons) == 2
    assert get("lowrank").run(prog.clone(), ctx) is False  # nothing eligible


@pytest.mark.parametrize("method", ["fx", "export"])
def test_declines_name_the_layer_they_refuse(method):
    prog = capture(Refused().eval(), (torch.randn(1, 8, 4, 4),), method=method)
    ctx = context(prog, calibrate=False)
    get("lowrank").candidates(prog, ctx)
    by_name = {n.name: view(n, prog.gm) for n in prog.gm.graph.nodes}
    refused = {}
    for rule, node, why in ctx.stats.declined:
        assert rule == "lowrank" and by_name.get(node) is not None, (node, why)
        refused.setdefault(next(k for k in ("grouped", "transposed", "shared") if k in why), []).append(by_name[node])
    assert [op.attrs["groups"] for op in refused["grouped"]] == [2]
    assert [op.attrs["transposed"] for op in refused["transposed"]] == [True]
    shared = refused["shared"]
    assert [op.kind for op in shared] == ["linear", "linear"] and shared[0].node is not shared[1].node


@pytest.mark.parametrize("method", ["fx", "export"])
def test_before_expected_each_eligible_layer_becomes_two(method):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    x = torch.randn(2, 3, 4, 4)
    prog = capture(model, (x,), method=method)
    assert op_kinds(prog.gm) == ["conv", "act:relu", "conv", "flatten", "linear"]
    ctx = context(prog, calibrate=False, lowrank_keep=0.5)
    assert get("lowrank").run(prog, ctx) is True
    assert op_kinds(prog.gm) == ["conv", "conv", "act:relu", "conv", "flatten", "linear", "linear"]
    assert ctx.stats.matched == {"lowrank": 2}
    ((rule, node, why),) = ctx.stats.declined  # the grouped conv stays, and the decline says which it is
    grouped = view(next(n for n in prog.gm.graph.nodes if n.name == node), prog.gm)
    assert rule == "lowrank" and grouped.attrs["groups"] == 4 and "groups=4" in why
    prog.recompile()
    assert prog(x).shape == (2, 10)


def test_on_a_gpu_target_tiny_layers_decline_and_a_big_linear_at_batch_1_is_proposed():
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 64), nn.Linear(64, 64)).eval()
    prog = capture(model, (torch.randn(1, 4096),), method="fx")
    ctx = context(prog, target="a100", calibrate=False)
    actions = get("lowrank").candidates(prog, ctx)
    assert {a.group for a in actions} == {"_0"}  # fx names the first linear's node "_0"
    assert all(a.info["rank"] % 8 == 0 and a.predicted_gain_s > 0 and a.info["method"] == "SVD" for a in actions)
    declined = {n: why for _, n, why in ctx.stats.declined}
    assert "no rank below break-even on a100" in declined["_3"]


def test_run_applies_the_kept_fraction_and_nothing_without_it():
    model = mlp()
    x = torch.randn(4, 48)
    prog = capture(model, (x,))
    before = prog.gm.code
    assert get("lowrank").run(prog, context(prog)) is False and prog.gm.code == before
    half = prog.clone()
    assert get("lowrank").run(half, context(prog, lowrank_keep=0.5)) is True
    half.recompile()
    assert half(x).shape == (4, 10)
    assert half.param_count() == sum(r * (m + k) + m for m, k, r in [(64, 48, 24), (32, 64, 16), (10, 32, 5)])


def test_an_unknown_method_is_an_error():
    prog = capture(mlp(), (torch.randn(4, 48),))
    with pytest.raises(ValueError, match="lowrank_method"):
        get("lowrank").candidates(prog, context(prog, lowrank_method="qr"))


def test_measuring_keeps_only_ranks_faster_here_and_times_each_shape_once(monkeypatch):
    calls = []

    def fake_compare(fns, **kw):  # ranks up to 32 are faster, the rest slower
        calls.append(sorted(fns))
        return {k: Timing(1.0 if k == "dense" else (0.5 if int(k) <= 32 else 2.0), 0, 0, 3) for k in fns}

    monkeypatch.setattr(lr, "compare", fake_compare)
    monkeypatch.setattr(lr, "calls_per_block", lambda fn, **kw: 1)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 200)).eval()
    prog = capture(model, (torch.randn(2, 256),))
    ctx = context(prog, calibrate=False, measure=True)
    actions = get("lowrank").candidates(prog, ctx)
    assert actions and all(a.info["rank"] <= 32 and a.info["layer_measured_gain_s"] == 0.5 for a in actions)
    assert len(calls) == 2  # the two 256×256 layers share one timing


def test_measuring_for_real_returns_a_gain_per_rank():
    prog = capture(cnn(), (torch.randn(2, 3, 6, 6),))
    ctx = context(prog, calibrate=False)
    layers = {ly.node: ly for ly in lr.eligible_layers(prog, ctx)}
    cache: dict = {}
    for ly in layers.values():
        gains = lr.measured_gains(ly, [8], 0.01, cache)
        assert set(gains) == {8} and math.isfinite(gains[8])
    assert len(cache) == len(layers)


class NearlyLowRank(nn.Module):
    """Weights of rank 8 plus a little noise: a rank-16 factor loses almost nothing."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(256, 256), nn.Linear(256, 16)
        with torch.no_grad():
            low = torch.randn(256, 8, generator=g) @ torch.randn(8, 256, generator=g) / 16
            self.fc1.weight.copy_(low + 1e-4 * torch.randn(256, 256, generator=g))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_the_allocator_spends_the_budget_on_factors():
    import optic

    model = NearlyLowRank().eval()
    x = torch.randn(8, 256)
    data = [torch.randn(8, 256) for _ in range(6)]
    fast = optic.optimize(model, (x,), target="cpu", passes=["lowrank"], budget=optic.Budget(max_drop=0.01, metric="rel_error"),
                          calibration=data, measure=False)
    rec = fast.report.pass_record("lowrank")
    rows = [r for r in fast.report.budget["actions"] if r["pass"] == "lowrank"]
    kept = [r for r in rows if r["status"] == "kept"]
    assert rec.changed and len(kept) == 1 and kept[0]["layer"] == "fc1" and kept[0]["rank"] >= 8
    assert kept[0]["method"] == "activation-aware SVD" and kept[0]["energy_kept"] > 0.999
    assert rec.params_after < rec.params_before
    with torch.no_grad():
        assert rel(fast(x), model(x)) < 0.01


# -- property ----------------------------------------------------------------------------------------
@settings(deadline=None)
@given(st.one_of(mlp_models(), cnn_models()), st.sampled_from(["fx", "fx", "export"]),
       st.sampled_from(["activation", "svd"]), st.floats(0.05, 1.0))
def test_property_full_rank_reproduces_and_any_rank_runs(case, method, factoring, keep):
    model, inputs = case
    prog = capture(model, inputs, method=method)
    ctx = context(prog, lowrank_method=factoring)
    full = build(prog, get("lowrank").actions_at(prog, ctx, 1.0))
    with torch.no_grad():
        ref = model(*inputs)
        c = compare(ref, full(*inputs), 1e-4)
        assert c.ok, str(c)
        low = build(prog, get("lowrank").actions_at(prog, ctx, keep))
        assert low(*inputs).shape == ref.shape
