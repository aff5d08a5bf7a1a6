"""quantize: the integer math, the kernels against the integer reference, calibration, the pass's surgery
(int8 chains requantize in the producer's epilogue) and the budgeted result."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
from helpers import ResidualBlock, op_kinds
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import examples

import optic
from optic import targets
from optic.backend import int8
from optic.budget.allocator import build
from optic.budget.calibration import Budget, split
from optic.ir.capture import capture
from optic.ir.opview import view
from optic.passes import quantize as q
from optic.pipeline.registry import get
from optic.pipeline.runner import PassContext

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="int8 kernels are oneDNN's")


# -- the integer math --------------------------------------------------------------------------------
def test_weight_quantization_is_symmetric_per_channel_and_within_half_a_step():
    w = torch.randn(6, 4, 3, 3)
    w[2] = 0  # an all-zero channel keeps a finite scale
    s = int8.weight_scales(w)
    qw = int8.quantize_weight(w, s)
    assert qw.dtype == torch.int8 and int(qw.abs().max()) == int8.WEIGHT_MAX
    assert s[2] == 1 and not qw[2].any()
    err = (qw.double() * s.double().reshape(-1, 1, 1, 1) - w.double()).abs()
    assert bool((err <= s.double().reshape(-1, 1, 1, 1) / 2 + 1e-7).all())


@given(lo=st.floats(-50, 50), width=st.floats(1e-3, 100))
def test_activation_params_cover_the_range_and_zero_exactly(lo, width):
    hi = lo + width
    s, z = q.activation_params(lo, hi)
    assert 0 <= z <= 255 and s > 0
    assert int8.fake_quantize(torch.tensor([0.0]), s, z).item() == 0.0  # zero (padding, ReLU) is exact
    x = torch.tensor([min(lo, 0.0), max(hi, 0.0)], dtype=torch.float64)
    assert bool(((int8.fake_quantize(x, s, z) - x).abs() <= s * 0.5 + 1e-9).all())


def test_percentile_clips_an_outlier_and_mse_minimises_the_error_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    r = q._Range(samples=[torch.randn(20000, generator=g)])
    r.samples[0][0] = 400.0
    r.lo, r.hi = float(r.samples[0].min()), 400.0
    ranges = q.candidate_ranges(r)
    assert ranges["percentile"][0] < ranges["minmax"][0] / 10

    torch.manual_seed(0)
    tails = torch.distributions.StudentT(2.0).sample((20000,)).double()  # heavy tails
    r = q._Range(float(tails.min()), float(tails.max()), [tails.float()])
    ranges = q.candidate_ranges(r)
    mse = {m: float((int8.fake_quantize(tails, *p) - tails).pow(2).mean()) for m, p in ranges.items()}
    assert ranges["mse"][0] < ranges["minmax"][0] and mse["mse"] < mse["minmax"] and mse["mse"] <= mse["percentile"]


# -- the kernels against the integer reference ----------------------------------------------------------
conv_cases = st.fixed_dictionaries({
    "n": st.integers(1, 3), "c": st.sampled_from([3, 8, 16]), "o": st.sampled_from([4, 8, 24]),
    "hw": st.integers(4, 9), "k": st.sampled_from([1, 3]), "stride": st.integers(1, 2),
    "groups": st.sampled_from([1, 2]), "zp": st.integers(0, 255), "post": st.sampled_from(["none", "relu"]),
    "seed": st.integers(0, 2**16)})


def _qconv(case, x_scale, w_scales, bias, out=None):
    g = torch.Generator().manual_seed(case["seed"])
    c, o, groups = case["c"] * case["groups"] if case["c"] % case["groups"] else case["c"], case["o"], case["groups"]
    qx = torch.randint(0, 256, (case["n"], c, case["hw"], case["hw"]), generator=g, dtype=torch.uint8)
    qw = torch.randint(-127, 128, (o, c // groups, case["k"], case["k"]), generator=g).to(torch.int8)
    pad = case["k"] // 2
    args = ([case["stride"]] * 2, [pad] * 2, [1, 1], groups)
    ws, b = w_scales(o, g), bias(o, g)
    s_out, z_out = out or (1.0, 0)
    got = int8.CONV(qx, x_scale, case["zp"], qw, ws, b, *args, s_out, z_out, out is not None, case["post"], [], "")
    ref = int8.conv_reference(qx, x_scale, case["zp"], qw, ws, b, *args, post=(case["post"], [], ""), out=out)
    return got, ref


@examples(25)
@given(case=conv_cases)
def test_conv_kernel_accumulates_exactly_what_the_integer_reference_does(case):
    """Unit scales and no bias: the float32 output is the int32 accumulation itself, so any
    difference in the zero-point compensation or the sum shows up bit for bit."""
    out, ref = _qconv(case, 1.0, lambda o, g: torch.ones(o), lambda o, g: None)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out.double(), ref.double())


@examples(25)
@given(case=conv_cases, x_scale=st.floats(1e-3, 0.1))
def test_conv_kernel_scales_like_the_reference(case, x_scale):
    out, ref = _qconv(case, x_scale, lambda o, g: torch.rand(o, generator=g) * 0.01 + 1e-4,
                      lambda o, g: torch.randn(o, generator=g))
    assert torch.allclose(out.double(), ref.double(), rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@examples(25)
@given(m=st.integers(1, 9), k=st.sampled_from([4, 16, 64]), n=st.sampled_from([8, 24]), zp=st.integers(0, 255),
       seed=st.integers(0, 2**16), lead=st.booleans())
def test_linear_kernel_accumulates_exactly_what_the_integer_reference_does(m, k, n, zp, seed, lead):
    g = torch.Generator().manual_seed(seed)
    shape = (2, m, k) if lead else (m, k)
    qx = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    qw = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    out = int8.LINEAR(qx, 1.0, zp, qw, torch.ones(n), None, 1.0, 0, False, "none", [], "")
    assert out.shape == (*shape[:-1], n)
    assert torch.equal(out.double(), int8.linear_reference(qx, 1.0, zp, qw, torch.ones(n), None).double())


def test_requantized_output_is_within_one_step_of_the_reference():
    """The uint8 epilogue rounds ``y / s_out`` in float32: at most one step from the exact rounding."""
    case = {"n": 2, "c": 16, "o": 24, "hw": 8, "k": 3, "stride": 1, "groups": 1, "zp": 7, "post": "relu", "seed": 3}
    scales, bias = (lambda o, g: torch.rand(o, generator=g) * 0.01 + 1e-3), (lambda o, g: torch.randn(o, generator=g))
    y, _ = _qconv(case, 0.02, scales, bias)
    got, want = _qconv(case, 0.02, scales, bias, out=(float(y.max()) / 255, 0))
    assert got.dtype == want.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def test_a_weight_edited_in_place_is_packed_again():
    qx = torch.randint(0, 256, (1, 8, 5, 5), dtype=torch.uint8)
    qw = torch.randint(-127, 128, (4, 8, 3, 3)).to(torch.int8)
    args = ([1, 1], [1, 1], [1, 1], 1, 1.0, 0, False, "none", [], "")
    before = int8.CONV(qx, 1.0, 0, qw, torch.ones(4), None, *args)
    qw.mul_(-1)
    after = int8.CONV(qx, 1.0, 0, qw, torch.ones(4), None, *args)
    assert torch.equal(after, -before)


# -- the pass ------------------------------------------------------------------------------------------
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64 * 8 * 8, 10)).eval()


def context(prog, n=4, **options) -> PassContext:
    x = prog.example_args[0]
    g = torch.Generator().manual_seed(1)
    cal = split([torch.randn(x.shape, generator=g) for _ in range(n)], Budget(), single_input=True,
                batch_size=x.shape[0])
    return PassContext(target=targets.get("cpu"), measure=True, calibration=cal, options=options)


def _int8_host() -> bool:
    return q.int8_supported(targets.get("cpu").isa) is None


needs_int8 = pytest.mark.skipif(not _int8_host(), reason="this CPU has no VNNI/AMX: the pass declines (tested below)")


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@needs_int8
@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_layer_in_int8_chains_uint8_between_consecutive_layers(method):
    model, x = cnn(), torch.randn(2, 3, 16, 16)
    prog = capture(model, (x,), method=method)
    actions = get("quantize").candidates(prog, context(prog, quantize_min_macs=0))
    assert len(actions) == 4 and {a.info["calibration"] for a in actions} <= set(q.METHODS)
    out = build(prog, actions)
    calls = _targets(out.gm)
    assert calls.count(int8.CONV) == 3 and calls.count(int8.LINEAR) == 1
    assert calls.count(int8.quantize_u8) == 1, "only the model's input is quantized; the rest is requantized in epilogues"
    kernels = [n for n in out.gm.graph.nodes if n.target in (int8.CONV, int8.LINEAR)]
    assert [n.args[int8.OUT_ARGS[n.target][2]] for n in kernels] == [True, True, True, False]
    with torch.no_grad():
        ref, got = model(x), out(x)
    assert float((got - ref).norm() / ref.norm()) < 0.05
    assert prog.param_count() == sum(p.numel() for p in model.parameters())  # the base is untouched


@needs_int8
def test_the_dump_shows_each_quantize_boundary_with_its_layer_and_pass():
    from optic.dump import render_text

    model, x = cnn(), torch.randn(2, 3, 16, 16)
    prog = capture(model, (x,), method="fx")
    out = build(prog, q.one_per_layer(get("quantize").candidates(prog, context(prog, quantize_min_macs=0)), smoothed=False))
    steps = [n for n in out.gm.graph.nodes if n.target is int8.quantize_u8]
    assert steps and all(n.meta["optic"]["pass"] == "quantize" for n in steps)
    text = render_text(out)
    for n in steps:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"#   {n.name} <- "))
        assert line.endswith("[quantize]") and "_0" in line  # the first conv's nodes are its origin


@needs_int8
def test_a_layer_whose_output_is_also_read_in_float_is_not_chained():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y) * y  # read in float (a residual add would read its uint8: see below)

    model, x = Res().eval(), torch.randn(1, 16, 12, 12)
    prog = capture(model, (x,))
    out = build(prog, q.one_per_layer(get("quantize").candidates(prog, context(prog, quantize_min_macs=0)), smoothed=False))
    kernels = [n for n in out.gm.graph.nodes if n.target == int8.CONV]
    assert len(kernels) == 2 and not any(n.args[12] for n in kernels)
    assert _targets(out.gm).count(int8.quantize_u8) == 2
    with torch.no_grad():
        assert float((out(x) - model(x)).norm() / model(x).norm()) < 0.05


@needs_int8
def test_declines_say_why_and_small_layers_stay_float():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    prog = capture(model, (torch.randn(1, 8),))
    ctx = context(prog)
    assert get("quantize").candidates(prog, ctx) == []
    assert ctx.stats.declined and all("too small" in why for _, _, why in ctx.stats.declined)


def test_no_int8_instructions_or_another_target_declines_with_a_note():
    assert "VNNI" in q.int8_supported({"avx2", "fma"})
    assert q.int8_supported({"avx512_vnni"}) is None and q.int8_supported({"amx_int8"}) is None
    model, x = cnn(), torch.randn(1, 3, 16, 16)
    prog = capture(model, (x,))
    ctx = context(prog)
    ctx.measure, ctx.target = False, targets.get("a100")
    from optic.pipeline.report import PassRecord
    ctx.record = PassRecord("quantize", False)
    assert get("quantize").candidates(prog, ctx) == []
    assert "CPUs only" in ctx.record.notes[0] and "'a100' is a GPU" in ctx.record.notes[0]
    ctx.target, ctx.record = targets.get("cpu"), PassRecord("quantize", False)  # a CPU, but not measured here
    assert get("quantize").candidates(prog, ctx) == []
    assert "not this machine" in ctx.record.notes[0]


@needs_int8
def test_the_int8_model_copies_pickles_and_keeps_plain_int8_weights():
    model, x = cnn(), torch.randn(1, 3, 16, 16)
    prog = capture(model, (x,))
    out = build(prog, q.one_per_layer(get("quantize").candidates(prog, context(prog, quantize_min_macs=0)), smoothed=False))
    with torch.no_grad():
        want = out.gm(x)
        assert torch.equal(copy.deepcopy(out.gm)(x), want)
        buf = io.BytesIO()
        torch.save(out.gm, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), want)
        again = pickle.loads(pickle.dumps(out.gm))
        assert torch.equal(again(x), want)
    # the same nodes after the round trip (fx traces a pickled graph's code again: a quantize step that was a
    # Python function came back as its five ops, which neither the fused kernels nor Inductor recognize)
    assert _targets(again) == _targets(out.gm) and _targets(out.gm).count(int8.quantize_u8) == 1
    ints = [v for v in out.gm.state_dict().values() if v.dtype == torch.int8]
    assert len(ints) == 4 and all(v.dtype == torch.int8 and v.layout == torch.strided for v in ints)


@needs_int8
def test_optimize_with_a_budget_reports_the_int8_layers_and_stays_within_it():
    model = cnn()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(6)]
    budget = Budget(max_drop=0.05, metric="rel_error")
    fast = optic.optimize(model, (data[0][:1],), target="cpu", passes="default", budget=budget, calibration=data,
                          options={"quantize_min_macs": 0})
    rows = [r for r in fast.report.budget["actions"] if r["pass"] == "quantize"]
    assert len(rows) == 4 and all(r["precision"] == "int8" and r["calibration"] in q.METHODS for r in rows)
    assert all(r["status"] for r in rows)
    text = fast.report.budget_table()
    assert "quantize" in text and "int8" in text
    from optic.budget.calibration import Evaluator
    cal = split(data, budget, single_input=True, batch_size=None)
    assert Evaluator(budget, cal, model).drop(fast, "holdout") <= 0.05


def test_the_roofline_credits_int8_with_the_targets_int8_rate():
    """A compute-bound GEMM is predicted faster in int8 wherever the target has an int8 figure (it was
    costed at the float32 rate, and no layer was ever proposed)."""
    from optic.pipeline import cost

    flops, elems = 2 * 512 * 3072 * 768, 512 * 768 + 3072 * 768 + 512 * 3072
    for name in ("cpu", "a100", "h100"):
        t = targets.get(name)
        if t.peak_flops("int8"):
            assert cost.kernel_seconds(flops, elems, t, "int8") < cost.kernel_seconds(flops, 4 * elems, t, "float32")


# -- before / expected ------------------------------------------------------------------------------
def _kind(target) -> str:
    return str(getattr(target, "__name__", target))  # how op_kinds writes an op the op view does not know


@needs_int8
@pytest.mark.parametrize("method", ["fx", "export"])
def test_before_expected_every_layer_becomes_an_int8_kernel_with_its_activation(method):
    model, x = cnn(), torch.randn(2, 3, 16, 16)
    prog = capture(model, (x,), method=method)
    assert op_kinds(prog.gm) == ["conv", "act:relu"] * 3 + ["flatten", "linear"]
    ctx = context(prog, quantize_min_macs=0)
    assert get("quantize").run(prog, ctx) is True
    assert ctx.stats.matched.get("quantize") == 4  # every layer, counted as the other lossy runs count
    conv, linear = _kind(int8.CONV), _kind(int8.LINEAR)
    assert op_kinds(prog.gm) == [_kind(int8.quantize_u8), conv, conv, conv, "flatten", linear]


@pytest.mark.parametrize("method", ["fx", "export"])
def test_declines_name_the_layers_that_stay_float(method):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.small, self.big = nn.Linear(8, 4), nn.Linear(64, 64)

        def forward(self, x):
            return self.big(x), self.small(x[:, :8]), self.big(x)  # big's weight is read twice

    prog = capture(M().eval(), (torch.randn(4, 64),), method=method)
    ctx = context(prog, quantize_min_macs=1000)
    assert get("quantize").layers(prog, ctx) == []
    kinds = {n.name: op.kind for n in prog.gm.graph.nodes if (op := view(n, prog.gm)) is not None}
    declined = [(node, why) for rule, node, why in ctx.stats.declined if rule == "quantize"]
    assert [kinds.get(node) for node, _ in declined] == ["linear", "linear", "linear"]
    assert [why.split(":")[0] for _, why in declined] == [
        "the weight is shared with another op (tied weights)", f"{4 * 8 * 4} multiply-adds",  # rows × in × out
        "the weight is shared with another op (tied weights)"]


@needs_int8
def test_a_cpu_variant_whose_rounding_breaks_the_budget_is_not_offered():
    """The numerical check is widened after int8 rounding, so the CPU step checks each variant's held-out drop:
    a compiled variant that crosses the budget would make the final check return the captured graph."""
    from types import SimpleNamespace

    from helpers import int8_program

    from optic.backend.vendor import over_budget
    from optic.ir.rewrite import RuleStats

    prog = int8_program(cnn(), torch.randn(2, 3, 16, 16))
    variants = {"torch ops": prog, "fine": prog.clone(), "drifts": prog.clone()}
    drifting = variants["drifts"].gm
    drops = []

    class Evaluator:
        def drop(self, model, split):
            drops.append(split)
            return 0.02 if model is drifting else 0.004

    ctx = SimpleNamespace(evaluator=Evaluator(), budget=Budget(max_drop=0.01), stats=RuleStats())
    assert over_budget(variants, prog, ctx) == ["drifts"]
    assert drops == ["holdout", "holdout"]  # the program as it is was checked by the allocator: not again
    (rule, _, why), = ctx.stats.declined
    assert rule == "budget_check" and "drifts: its rounding moves the held-out drop to 0.0200, over the budget 0.01" in why
    exact = capture(cnn(), (torch.randn(2, 3, 16, 16),))  # no int8 rounding: the numerical check guards it
    assert over_budget({"torch ops": exact, "drifts": exact.clone()}, exact, ctx) == [] and len(drops) == 2


def test_the_size_floor_is_lower_where_optic_s_generated_kernels_will_run():
    # oneDNN's int8 operator costs ~37 µs a call, so small layers stay fp32; a generated kernel costs ~3 µs and
    # each layer's gain is then timed, so only layers far below that stay out (an explicit option always wins)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)  # 4 x 64 x 64 = 16,384 multiply-adds

        def forward(self, x):
            return self.fc(x)

    prog = capture(M().eval(), (torch.randn(4, 64),), method="fx")
    quantize = get("quantize")
    assert q.MIN_MACS > 16_384 > q.GENERATED_MIN_MACS
    assert quantize.layers(prog, context(prog)) == []
    ctx = context(prog)
    ctx.generated_after = True
    assert [la.op.node.name for la in quantize.layers(prog, ctx)] == ["fc"]
    ctx = context(prog, quantize_min_macs=20_000)
    ctx.generated_after = True
    assert quantize.layers(prog, ctx) == []


# -- activation smoothing (SmoothQuant) -----------------------------------------------------------------
@given(seed=st.integers(0, 2**16), alpha=st.sampled_from(q.SMOOTH_ALPHAS), spread=st.floats(1, 1e4))
def test_smoothing_factors_are_powers_of_two_that_keep_the_product_exact(seed, alpha, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 24, generator=g) * (torch.rand(24, generator=g) * spread + 1e-3)
    w = torch.randn(8, 24, generator=g)
    w[:, 3] = 0  # an all-zero column keeps the factor 1
    s = q.smoothing_factors(x.abs().amax(0), w, alpha)
    assert bool((torch.log2(s) == torch.round(torch.log2(s))).all()) and float(s[3]) == 1.0
    # dividing the input and multiplying the weight by powers of two changes no product: exact in float32
    assert torch.equal((x * (1 / s)) * (w * s)[2], x * w[2])


class _Outliers(nn.Module):
    """A linear reading an input whose few channels are 40x the rest (a trained transformer's LayerNorm output)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.out = nn.Linear(64, 128), nn.Linear(128, 10)
        self.register_buffer("gain", torch.ones(64))
        self.gain[:4] = 40.0

    def forward(self, x):
        return self.out(torch.relu(self.fc(x * self.gain)))


@needs_int8
def test_smoothing_is_proposed_where_a_few_channels_dominate_and_computes_the_integer_reference():
    model, x = _Outliers().eval(), torch.randn(4, 16, 64)
    prog = capture(model, (x,))
    actions = get("quantize").candidates(prog, context(prog, quantize_min_macs=0))
    fc = [a for a in actions if a.layer == "fc"]
    plain = next(a for a in fc if "smoothing_alpha" not in a.info)
    smoothed = next(a for a in fc if "smoothing_alpha" in a.info)
    err = lambda a: a.info["layer_errors"][a.info["calibration"]]  # noqa: E731
    assert err(smoothed) <= q.SMOOTH_GAIN * err(plain)
    assert smoothed.level < plain.level and smoothed.group == plain.group  # a milder level of the same layer
    assert not any("smoothing_alpha" in a.info for a in actions if a.layer == "out")  # its input is even
    out = build(prog, [smoothed])
    mul = next(n for n in out.gm.graph.nodes if n.target is torch.ops.aten.mul.Tensor and n.args[1].op == "get_attr")
    inv = getattr(out.gm, mul.args[1].target)
    kernel = next(n for n in out.gm.graph.nodes if n.target is int8.LINEAR)
    assert kernel.args[0].args[0] is mul  # divide, then quantize, then the int8 linear
    # the integers the graph computes are the reference's on the smoothed input and the smoothed weight
    scale, zp, attr = kernel.args[1], kernel.args[2], kernel.args[9]
    qw, ws = getattr(out.gm, kernel.args[3].target), getattr(out.gm, kernel.args[4].target)
    assert attr == "relu"
    h = int8.linear_reference(int8.quantize_u8(x * model.gain * inv, scale, zp), scale, zp, qw, ws,
                              model.fc.bias.detach(), ("relu", [], ""))
    with torch.no_grad():
        want = torch.nn.functional.linear(h.float(), model.out.weight, model.out.bias)
        assert torch.allclose(out(x), want, rtol=1e-4, atol=1e-4)
        assert float((out(x) - model(x)).norm() / model(x).norm()) < 0.02


@needs_int8
@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_conv_s_residual_add_reads_the_int8_value_its_input_was_quantized_to(method):
    model, x = ResidualBlock().eval(), torch.randn(2, 3, 12, 12)
    prog = capture(model, (x,), method=method)
    out = build(prog, q.one_per_layer(get("quantize").candidates(prog, context(prog, quantize_min_macs=0))))
    dq = [n for n in out.gm.graph.nodes if n.target is int8.dequantize_u8]
    assert len(dq) == 1
    quant = dq[0].args[0]
    add = next(iter(dq[0].users))
    assert quant.target is int8.CONV and quant.args[12], "the stem now writes uint8 only: the add reads it too"
    assert any(a.target is int8.CONV and a is not quant for a in add.args)  # conv b's float out, plus it
    # the block's residual is the stem's uint8 output, dequantized: that is what the graph adds
    with torch.no_grad():
        h = torch.relu(model.stem(x))
        scale, zp = float(quant.args[10]), int(quant.args[11])
        assert (dq[0].args[1], dq[0].args[2]) == (scale, zp)
        assert float((out(x) - model(x)).norm() / model(x).norm()) < 0.05
    # Inductor's form: dequantize_per_tensor of the same uint8, the pattern its conv + sum post-op fusion takes
    qdq = int8.as_qdq(out.gm)
    assert any(n.target is torch.ops.quantized_decomposed.dequantize_per_tensor.default
               and next(iter(n.users)).target in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor,
                                                  __import__("operator").add)
               for n in qdq.graph.nodes if n.op == "call_function" and len(n.users) == 1)
    with torch.no_grad():
        want, got = out.gm(x), qdq(x)
        want, got = (want[0], got[0]) if isinstance(want, (tuple, list)) else (want, got)
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    deq = (int8.quantize_u8(h, scale, zp).float() - zp) * scale
    assert float((deq - h).abs().max()) <= scale / 2 + 1e-6  # the residual moved by half a step at most


# -- bias correction ----------------------------------------------------------------------------------
class _PositiveInput(nn.Module):
    """A linear reading a ReLU's output: its input's mean is far from zero, so the weight's rounding shifts
    every output by the same amount (a systematic error), not by noise around zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(32, 256), nn.Linear(256, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _layer_and_range(prog, ctx, out_features):
    layer = next(la for la in get("quantize").layers(prog, ctx) if la.op.const("weight").shape[0] == out_features)
    r = q.observe(prog, [layer.op.x], ctx.calibration.fit_inputs())[layer.op.x.name]
    return layer, r


@needs_int8
@pytest.mark.parametrize("method", ["fx", "export"])
def test_bias_correction_removes_the_systematic_error_and_the_graph_computes_the_corrected_reference(method):
    model, x = _PositiveInput().eval(), torch.randn(8, 16, 32)
    prog = capture(model, (x,), method=method)
    ctx = context(prog, quantize_min_macs=0)
    actions = {a.layer: a for a in get("quantize").candidates(prog, ctx)}
    fc2 = actions["fc2"]
    assert fc2.info["bias_corrected"] and "bias-corrected" in fc2.describe
    assert not actions["fc1"].info["bias_corrected"]  # a zero-mean input: its mean error is noise, not kept
    off = get("quantize").candidates(prog, context(prog, quantize_min_macs=0, quantize_bias_correction=False))
    assert not any(a.info["bias_corrected"] or "bias-corrected" in a.describe for a in off)
    layer, r = _layer_and_range(prog, ctx, 16)
    cal = get("quantize")._calibrate(layer, r, r.first)
    assert cal.bias_shift is not None
    # out of sample: on inputs the calibration never saw, the corrected layer is closer to the float one
    h = torch.relu(model.fc1(torch.randn(64, 32, generator=torch.Generator().manual_seed(7)))).detach()
    plain = q._layer_error(layer, h, cal.scale, cal.zero_point)
    corrected = q._layer_error(layer, h, cal.scale, cal.zero_point, shift=cal.bias_shift)
    assert corrected < 0.95 * plain, (corrected, plain)
    # the graph: the kernel's bias is the float bias less the shift, and it computes the integer reference with it
    out = build(prog, [fc2])
    kernel = next(n for n in out.gm.graph.nodes if n.target is int8.LINEAR)
    bias = getattr(out.gm, kernel.args[5].target)
    assert torch.allclose(bias, model.fc2.bias.detach() - cal.bias_shift, atol=1e-6)
    scale, zp = kernel.args[1], kernel.args[2]
    qw, ws = getattr(out.gm, kernel.args[3].target), getattr(out.gm, kernel.args[4].target)
    with torch.no_grad():
        hx = torch.relu(model.fc1(x))
        want = int8.linear_reference(int8.quantize_u8(hx, scale, zp), scale, zp, qw, ws, bias)
        assert torch.allclose(out(x), want.float(), rtol=1e-4, atol=1e-4)


@examples(25)
@given(seed=st.integers(0, 2**16), offset=st.floats(0, 4), rows=st.sampled_from([4, 32, 128]),
       post=st.sampled_from(["none", "relu"]))
def test_bias_correction_subtracts_the_mean_error_so_the_squared_error_drops_by_exactly_that_mean(seed, offset,
                                                                                                 rows, post):
    """The shift is the pre-activation mean error per output channel (not its negative, not another axis): with
    it subtracted the layer's squared error falls by rows x |mean|^2, within float32 rounding; it is returned only
    where that mean is a meaningful share of the error."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(24, 12)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(12, 24, generator=g))
    x = torch.randn(rows, 24, generator=g) + offset
    prog = capture(nn.Sequential(lin, nn.ReLU() if post == "relu" else nn.Identity()).eval(), (x,))
    layer = get("quantize").layers(prog, context(prog, quantize_min_macs=0))[0]
    s, zp = q.activation_params(float(x.min()), float(x.max()))
    shift = q.bias_correction(layer, x, s, zp)
    pre = q.Layer(layer.op, None, ("none", [], ""), layer.macs)
    err = (q.run_int8(pre, x, s, zp).double() - q.run_float(pre, x))
    mean = err.mean(0)
    share = float(mean.pow(2).sum()) * rows / float(err.pow(2).sum())
    if shift is None:
        assert share < max(q.BIAS_SHARE, q.BIAS_SAMPLES_FACTOR / rows) + 1e-9
        return
    assert torch.allclose(shift.double(), mean, atol=1e-6)
    fixed = (q.run_int8(pre, x, s, zp, shift=shift).double() - q.run_float(pre, x))
    want = float(err.pow(2).sum()) - rows * float(mean.pow(2).sum())
    assert abs(float(fixed.pow(2).sum()) - want) <= 1e-4 * float(err.pow(2).sum()) + 1e-8


class _Attention(nn.Module):
    def __init__(self, d: int = 32, explicit: bool = False):
        super().__init__()
        self.qkv, self.out, self.explicit = nn.Linear(d, 3 * d), nn.Linear(d, d), explicit

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        if self.explicit:
            att = (q @ k.transpose(-2, -1) / 32 ** 0.5).softmax(-1) @ v
        else:
            att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(att)


@needs_int8
@pytest.mark.parametrize("explicit", [False, True])
def test_the_report_says_which_attention_gemms_stay_float32_and_their_share_of_the_work(explicit):
    from optic.pipeline.report import PassRecord

    torch.manual_seed(0)
    model, x = _Attention(explicit=explicit).eval(), torch.randn(2, 16, 32)
    prog = capture(model, (x,), method="export")
    ctx = context(prog, quantize_min_macs=0)
    ctx.record = PassRecord(name="quantize", exact=False)
    actions = get("quantize").candidates(prog, ctx)
    assert {a.layer for a in actions} >= {"qkv", "out"}  # the linears still go int8
    # q·kᵀ and p·v: 2·16·16·(32+32) multiply-adds; the linears 2·16·32·96 and 2·16·32·32
    share = 32768 / (32768 + 98304 + 32768)
    note = [n for n in ctx.record.notes if "attention GEMM" in n]
    assert len(note) == 1 and f"{share:.1%}" in note[0]
    assert note[0].startswith("2 attention") if explicit else note[0].startswith("1 attention")
