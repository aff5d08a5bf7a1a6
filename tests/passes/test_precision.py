"""precision: bf16/fp16 layers on GPU targets, under the budget; the half-precision numerics computed on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis_profiles import examples
from strategies import any_model

import optic
from optic import targets
from optic.ir.capture import capture
from optic.ir.rewrite import RuleStats, find_sites
from optic.passes.precision import SITE, half_dtype, run_in
from optic.pipeline.registry import get
from optic.pipeline.report import PassRecord
from optic.pipeline.runner import PassContext
from optic.pipeline.verify import generated_inputs

precision = get("precision")


def _ctx(target="a100"):
    ctx = PassContext(target=targets.get(target), measure=False)
    ctx.record = PassRecord("precision", False)
    return ctx


class Block(nn.Module):
    """A conv, a linear, attention and a matmul between activations: every kind the pass covers."""

    def __init__(self, d=256):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.proj = nn.Linear(16 * 16, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 10)

    def forward(self, x):
        h = self.conv(x).relu().flatten(2).transpose(1, 2)  # [B, 16, 256]
        h = self.proj(h.reshape(h.shape[0], 16, 256))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q, k, v)
        s = torch.matmul(a, a.transpose(1, 2)).softmax(-1) @ a
        return self.out(s.mean(1))


def test_half_dtype_follows_the_tensor_cores():
    def auto(name):
        return half_dtype(targets.get(name))

    assert auto("a100") == "bfloat16" and auto("h100") == "bfloat16"
    assert auto("v100") == "float16" and auto("t4") == "float16"  # no bf16 tensor cores
    assert half_dtype(targets.get("v100"), "bfloat16") is None and half_dtype(targets.get("a100"), "float16") == "float16"


def test_every_layer_in_bf16_computes_what_torch_computes_in_bf16():
    torch.manual_seed(0)
    m, x = Block().eval(), torch.randn(64, 3, 16, 16)
    prog = capture(m, (x,))
    sites = find_sites(prog.gm, SITE, _ctx(), RuleStats())
    assert sorted(op.kind for op in sites) == ["conv", "linear", "linear", "linear", "matmul", "matmul", "sdpa"]
    for op in sites:  # every one, whatever the roofline says of these small layers: the numerics are tested
        run_in(prog.gm, op.node, torch.bfloat16)
    prog.gm.recompile()
    w = {k: v.bfloat16() for k, v in m.state_dict().items()}
    with torch.no_grad():  # the same layers in bf16 by hand: every GEMM-like op in bf16, the rest in fp32
        h = F.conv2d(x.bfloat16(), w["conv.weight"], w["conv.bias"], padding=1).float().relu().flatten(2).transpose(1, 2)
        h = F.linear(h.reshape(64, 16, 256).bfloat16(), w["proj.weight"], w["proj.bias"]).float()
        q, k, v = F.linear(h.bfloat16(), w["qkv.weight"], w["qkv.bias"]).float().chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
        s = torch.matmul(a.bfloat16(), a.transpose(1, 2).bfloat16()).float().softmax(-1)
        s = torch.matmul(s.bfloat16(), a.bfloat16()).float()
        expected = F.linear(s.mean(1).bfloat16(), w["out.weight"], w["out.bias"]).float()
        got = prog.gm(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert not torch.equal(got, m(x))  # it did change the numerics (bf16 keeps 8 bits of mantissa)


def test_a_module_called_twice_stays_fp32_where_the_other_call_was_not_chosen():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(1024, 1024)

        def forward(self, x):
            return self.fc(x) + self.fc(x * 2)

    m, x = Twice().eval(), torch.randn(1024, 1024)
    prog = capture(m, (x,), method="fx")
    actions = precision.candidates(prog, _ctx())
    assert len(actions) == 2
    actions[0].apply(prog)
    prog.gm.recompile()
    with torch.no_grad():
        expected = F.linear(x.bfloat16(), m.fc.weight.bfloat16(), m.fc.bias.bfloat16()).float() + m.fc(x * 2)
        assert torch.equal(prog.gm(x), expected)
    assert m.fc.weight.dtype == torch.float32  # the user's module is untouched


def test_the_plan_weighs_every_precision_the_target_has_rates_for():
    m, x = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 16)).eval(), torch.randn(2048, 4096)
    for name, expected in (("h100", {"fp32", "bf16", "fp16", "fp8", "int8"}), ("a100", {"fp32", "bf16", "fp16", "int8"}),
                           ("v100", {"fp32", "fp16"})):
        prog = capture(m, (x,), method="fx")
        ctx = _ctx(name)
        precision.candidates(prog, ctx)
        plan = ctx.record.measured["precision_plan"]
        big, small = plan["layers"]
        assert set(big["seconds"]) == expected == set(plan["totals_s"])
        t = big["seconds"]  # compute-bound: the narrower, the faster, as the data sheet's rates say
        assert t["fp32"] > t["fp16"] and ("int8" not in t or t["int8"] < t["fp16"])
        assert t[big["fastest"]] == min(t.values())
        assert big["fastest"] in ({"int8", "fp8"} if "int8" in t else {"fp16"})  # fp8 ties int8 on Hopper
        assert small["fastest"] == "fp32"  # 16 outputs: the casts cost more than the narrower GEMM saves
        note = next(n for n in ctx.record.notes if n.startswith(f"precision plan on {name}"))
        assert ("would need GPU kernels" in note) == ("int8" in expected)


def test_small_layers_are_declined_with_the_roofline_reason():
    m, x = nn.Sequential(nn.Linear(8, 8)).eval(), torch.randn(1, 8)
    prog = capture(m, (x,), method="fx")
    ctx = _ctx()
    assert precision.candidates(prog, ctx) == []
    (rule, node, why), = ctx.stats.declined
    assert rule == "precision" and "no predicted gain in bfloat16 on a100" in why and "µs" in why


def test_a_cpu_that_is_not_measured_is_a_note_not_a_change():
    m, x = nn.Sequential(nn.Linear(512, 512)).eval(), torch.randn(256, 512)
    prog = capture(m, (x,), method="fx")
    ctx = _ctx("cpu")  # measure=False
    assert precision.candidates(prog, ctx) == [] and not ctx.stats.declined
    assert any("kept only where it measures faster" in n for n in ctx.record.notes)


HOST_BF16 = bool(targets.get("cpu").peak_bf16_flops)


@pytest.mark.skipif(not HOST_BF16, reason="this CPU has no bf16 instructions (AMX-BF16, AVX512-BF16)")
def test_on_this_cpu_bf16_layers_are_measured_together_and_alternatives_of_int8():
    m, x = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)).eval(), torch.randn(256, 1024)
    prog = capture(m, (x,), method="fx")
    ctx = _ctx("cpu")
    ctx.measure = True
    actions = precision.candidates(prog, ctx)
    assert len(actions) == 2 and all(a.measured_together and not a.predicted_only for a in actions)
    assert {a.group for a in actions} == {"_0", "_2"} and {a.level for a in actions} == {0.5}  # int8 is level 1


@pytest.mark.skipif(not HOST_BF16, reason="this CPU has no bf16 instructions (AMX-BF16, AVX512-BF16)")
def test_on_this_cpu_the_budget_holds_and_bf16_stays_only_where_it_measured_faster():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512)).eval()
    cal = [torch.randn(256, 512, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    r = optic.optimize(m, cal[0], passes=["precision"], budget=optic.Budget(max_drop=0.02, metric="rel_error"),
                       calibration=cal)
    rows = [row for row in r.report.budget["actions"] if row["pass"] == "precision"]
    assert rows and all(row["precision"] == "bf16" and not row["predicted_only"] for row in rows)
    kept = [row for row in rows if row["status"] == "kept"]
    note = next(n for n in r.report.budget["notes"] if "measured together in the plain graph" in n)
    assert ("(kept)" in note) == bool(kept)
    assert all(row["measured_gain_s"] > 0 for row in kept)  # measured here, and faster
    held = torch.randn(256, 512, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref, got = m(held), r(held)
    assert float((got - ref).norm() / ref.norm()) <= 0.02


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(),
                         nn.Linear(1024, 10)).eval()


def test_the_precision_plan_respects_the_budget_and_reports_each_layer():
    m = _mlp()
    cal = [torch.randn(512, 256, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    budget = optic.Budget(max_drop=0.02, metric="rel_error")
    r = optic.optimize(m, cal[0], target="a100", passes="default", budget=budget, calibration=cal)
    rows = [row for row in r.report.budget["actions"] if row["pass"] == "precision"]
    # the two wide layers are proposed; the 10-way head is too small to gain on an A100
    assert {row["precision"] for row in rows} == {"bf16"} and {row["layer"] for row in rows} == {"0", "2"}
    assert any(d["rule"] == "precision" and d["node"] == "_4" for d in r.report.declines("precision"))
    kept = [row for row in rows if row["status"] == "kept"]
    assert kept and all(row["predicted_only"] for row in kept)  # a100 is not here: predicted, not measured
    # the budget holds on held-out data: the relative error of the bf16 model stays under 0.02
    held = torch.randn(512, 256, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref, got = m(held), r(held)
    assert 0 < float((got - ref).norm() / ref.norm()) <= 0.02
    bf16_layers = sum(1 for n in r.program.gm.graph.nodes if n.op == "call_method" and n.target == "to"
                      and n.args[1] == torch.bfloat16)
    assert bf16_layers >= len(kept)


def test_a_budget_too_small_for_bf16_keeps_every_layer_fp32():
    m = _mlp()
    cal = [torch.randn(128, 256, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    r = optic.optimize(m, cal[0], target="a100", passes="default", calibration=cal,
                       budget=optic.Budget(max_drop=1e-6, metric="rel_error"))
    x = torch.randn(64, 256)
    with torch.no_grad():
        assert torch.allclose(r(x), m(x), rtol=0, atol=1e-5)
    rows = [row for row in r.report.budget["actions"] if row["pass"] == "precision"]
    assert rows and all(row["status"] != "kept" for row in rows)


@examples(12)
@given(case=any_model())
def test_any_generated_model_in_half_precision_stays_within_bf16_rounding(case):
    """Every eligible layer of a generated model in bf16: the graph lints, its outputs stay float32 and within
    the error bf16 products can make (8-bit mantissa, fp32 accumulation), on inputs the pass never saw."""
    model, inputs = case
    prog = capture(model, inputs, method="fx")
    # every eligible layer, whatever the roofline says of these small ones: the rewrite is what is tested
    sites = find_sites(prog.gm, SITE, _ctx(), RuleStats())
    for op in sites:
        run_in(prog.gm, op.node, torch.bfloat16)
    prog.gm.recompile()
    changed = bool(sites)
    prog.gm.graph.lint()
    for args, _ in [(inputs, {})] + generated_inputs(inputs, {}, 1, seed=7):
        with torch.no_grad():
            ref, got = model(*args), prog.gm(*args)
        assert got.dtype == ref.dtype == torch.float32 and got.shape == ref.shape
        scale = float(ref.abs().max()) or 1.0
        err = float((got - ref).abs().max()) / scale
        assert err < 0.25, err  # several bf16 layers in a row: a loose bound, but a wrong rewrite is O(1)
        if not changed:
            assert err == 0
