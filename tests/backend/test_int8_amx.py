"""optic's generated AMX int8 kernels (optic.backend.int8_amx) against the integer reference, and the graph
that runs them: the same integers as the reference (bit for bit where no float rounding is involved,
one requantization step at most where it is), the quantize step bit for bit with PyTorch's, the
original graph left alone, other batch sizes served, copies and pickles computing the same."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from helpers import ResidualBlock, int8_program
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis_profiles import examples

from optic import targets
from optic.backend import int8, int8_amx, whole
from optic.pipeline.registry import get
from optic.pipeline.runner import PassContext

pytestmark = pytest.mark.skipif(int8_amx.unavailable() is not None, reason=str(int8_amx.unavailable()))
# every instruction set this CPU runs (AMX's tiles, AVX-512 VNNI): each kernel family is held to the reference
ISAS = [isa for isa in int8_amx.ISAS if int8_amx.unavailable(isa) is None] or ["none"]

conv_cases = st.fixed_dictionaries({
    "n": st.integers(1, 3), "c": st.sampled_from([1, 3, 4, 16, 64, 72, 128]), "o": st.sampled_from([4, 16, 24, 48]),
    "hw": st.integers(3, 10), "k": st.sampled_from([1, 3, 5]), "stride": st.integers(1, 3),
    "pad": st.integers(0, 2), "zp": st.integers(0, 255), "relu": st.booleans(), "seed": st.integers(0, 2**16)})


def _case(case):
    g = torch.Generator().manual_seed(case["seed"])
    qx = torch.randint(0, 256, (case["n"], case["c"], case["hw"], case["hw"]), generator=g, dtype=torch.uint8)
    qw = torch.randint(-127, 128, (case["o"], case["c"], case["k"], case["k"]), generator=g).to(torch.int8)
    return g, qx.contiguous(memory_format=torch.channels_last), qw


def _reference(qx, x_scale, zp, qw, ws, b, case, out=None):
    post = ("relu" if case["relu"] else "none", [], "")
    return int8.conv_reference(qx, x_scale, zp, qw, ws, b, [case["stride"]] * 2, [min(case["pad"], case["k"] // 2 + 1)] * 2,
                               [1, 1], 1, post=post, out=out)


def _kernel(qw, ws, b, x_scale, case, out=None, residual=False, isa=None):
    s_out, z_out = out or (1.0, 0)
    pad = min(case["pad"], case["k"] // 2 + 1)
    return int8_amx.Int8Kernel(qw, ws, b, x_scale, case["zp"], case["stride"], (pad, pad), s_out, z_out, out is not None,
                               case["relu"], residual, True, isa=isa)


@pytest.mark.parametrize("isa", ISAS)
@examples(30, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases)
def test_the_kernel_accumulates_exactly_what_the_integer_reference_does(case, isa):
    """Unit scales, no bias, float32 out: the output is the int32 accumulation less the zero point's
    share, so padding, channel padding, strides, tiles and the compensation show up bit for bit."""
    if case["hw"] + 2 * min(case["pad"], case["k"] // 2 + 1) < case["k"]:
        return
    _, qx, qw = _case(case)
    ones = torch.ones(case["o"])
    got = _kernel(qw, ones, None, 1.0, case, isa=isa)(qx)
    want = _reference(qx, 1.0, case["zp"], qw, ones, None, case)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.double(), want.double())


@pytest.mark.parametrize("isa", ISAS)
@examples(15, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases, x_scale=st.floats(1e-3, 0.1))
def test_a_kernel_on_the_thread_pool_computes_what_one_thread_does(case, x_scale, isa):
    """Calls of at least ``parallel_macs`` multiply-adds split their tasks over TVM's pool: the same integers
    and the same float epilogue as the one-thread kernel, bit for bit; smaller calls stay on one thread."""
    if case["hw"] + 2 * min(case["pad"], case["k"] // 2 + 1) < case["k"]:
        return
    g, qx, qw = _case(case)
    ws, b = torch.rand(case["o"], generator=g) * 0.01 + 1e-3, torch.randn(case["o"], generator=g)
    serial = _kernel(qw, ws, b, x_scale, case, out=(0.05, 7), isa=isa)
    pooled = _kernel(qw, ws, b, x_scale, case, out=(0.05, 7), isa=isa)
    pooled.parallel_macs = 1
    assert torch.equal(pooled(qx), serial(qx))
    assert [k[-1] for k in pooled._fns] == [True] and [k[-1] for k in serial._fns] == [False]
    pooled.parallel_macs = 10**12  # above any call here: one thread
    pooled._plans.clear()
    assert torch.equal(pooled(qx), serial(qx)) and sorted(k[-1] for k in pooled._fns) == [False, True]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("stride,hw", [(2, 8), (2, 7), (3, 10)])
def test_a_strided_1x1_conv_runs_the_stride_1_kernel_on_every_stride_th_pixel(isa, stride, hw):
    case = {"n": 2, "c": 64, "o": 48, "hw": hw, "k": 1, "stride": stride, "pad": 0, "zp": 7, "relu": False, "seed": 3}
    _, qx, qw = _case(case)
    ones = torch.ones(case["o"])
    kernel = _kernel(qw, ones, None, 1.0, case, isa=isa)
    assert kernel.subsample == stride and kernel.stride == 1  # the stride-th pixels only, not stride² the work
    got = kernel(qx)
    want = _reference(qx, 1.0, case["zp"], qw, ones, None, case)
    assert got.shape == want.shape and torch.equal(got.double(), want.double())


@pytest.mark.parametrize("isa", ISAS)
@examples(20, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases, x_scale=st.floats(1e-3, 0.1))
def test_the_requantized_output_is_within_one_step_of_the_reference(case, x_scale, isa):
    if case["hw"] + 2 * min(case["pad"], case["k"] // 2 + 1) < case["k"]:
        return
    g, qx, qw = _case(case)
    ws, b = torch.rand(case["o"], generator=g) * 0.01 + 1e-4, torch.randn(case["o"], generator=g)
    y = _reference(qx, x_scale, case["zp"], qw, ws, b, case)
    out = (max(float(y.abs().max()), 1e-3) / 127, 64)
    got = _kernel(qw, ws, b, x_scale, case, out, isa=isa)(qx)
    want = _reference(qx, x_scale, case["zp"], qw, ws, b, case, out)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


@pytest.mark.parametrize("isa", ISAS)
def test_a_residual_add_and_relu_in_the_epilogue_compute_the_float_ops(isa):
    case = {"n": 2, "c": 32, "o": 48, "hw": 7, "k": 3, "stride": 1, "pad": 1, "zp": 9, "relu": False, "seed": 5}
    g, qx, qw = _case(case)
    ws, b = torch.rand(48, generator=g) * 0.01 + 1e-4, torch.randn(48, generator=g)
    r = torch.randn(2, 48, 7, 7, generator=g)  # NCHW contiguous: the kernel takes it in its layout
    want = torch.relu(_reference(qx, 0.02, 9, qw, ws, b, case) + r.double())
    kernel = _kernel(qw, ws, b, 0.02, {**case, "relu": True}, residual=True, isa=isa)
    got = kernel(qx, r)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="residual"):  # a broadcast residual is not what was fused
        kernel(qx, r[:, :, :1, :1])


@pytest.mark.parametrize("isa", ISAS)
@examples(6, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases, r_scale=st.floats(1e-3, 0.5), r_zp=st.integers(0, 255), out_u8=st.booleans())
def test_a_uint8_residual_is_dequantized_in_the_epilogue_as_the_graph_does(case, r_scale, r_zp, out_u8, isa):
    """quantize's ResidualFromQuantized: the residual is the uint8 a conv's input was quantized to; the kernel
    reads it and computes what dequantize_u8 and the float residual kernel compute, within float rounding (LLVM
    fuses the dequantize's multiply with the add), so a requantized output may move one step at a tie."""
    if case["hw"] + 2 * min(case["pad"], case["k"] // 2 + 1) < case["k"]:
        return
    g, qx, qw = _case(case)
    ws, b = torch.rand(case["o"], generator=g) * 0.01 + 1e-4, torch.randn(case["o"], generator=g)
    float_res = _kernel(qw, ws, b, 0.02, case, out=(0.05, 7) if out_u8 else None, residual=True, isa=isa)
    plain = _kernel(qw, ws, b, 0.02, case, isa=isa)(qx)
    r = torch.randint(0, 256, plain.shape, generator=g, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    want = float_res(qx, int8.dequantize_u8(r, r_scale, r_zp))
    pad = min(case["pad"], case["k"] // 2 + 1)
    u8_res = int8_amx.Int8Kernel(qw, ws, b, 0.02, case["zp"], case["stride"], (pad, pad), *((0.05, 7, True) if out_u8
                                 else (1.0, 0, False)), case["relu"], True, True, isa=isa,
                                 residual_qparams=(r_scale, r_zp))
    got = u8_res(qx, r)
    if out_u8:
        diff = (got.int() - want.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    else:
        assert float((got - want).abs().max()) <= 1e-6 * max(float(want.abs().max()), 1.0)
    with pytest.raises(ValueError, match="uint8 residual"):
        u8_res(qx, int8.dequantize_u8(r, r_scale, r_zp))


@pytest.mark.parametrize("isa", ISAS)
@examples(20)
@given(m=st.integers(1, 40), k=st.sampled_from([4, 16, 64, 96, 256]), n=st.sampled_from([8, 16, 40]),
       zp=st.integers(0, 255), seed=st.integers(0, 2**16), lead=st.booleans())
def test_a_linear_is_the_kernel_over_rows_exactly(m, k, n, zp, seed, lead, isa):
    g = torch.Generator().manual_seed(seed)
    shape = (2, m, k) if lead else (m, k)
    qx = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    qw = torch.randint(-127, 128, (n, k), generator=g).to(torch.int8)
    kernel = int8_amx.Int8Kernel(qw, torch.ones(n), None, 1.0, zp, 1, (0, 0), 1.0, 0, False, False, False, False,
                                 isa=isa)
    got = kernel(qx)
    assert got.shape == (*shape[:-1], n)
    assert torch.equal(got.double(), int8.linear_reference(qx, 1.0, zp, qw, torch.ones(n), None).double())


@examples(20)
@given(shape=st.sampled_from([(1, 3, 5, 5), (2, 16, 4, 3), (37,), (4, 33)]), layout=st.sampled_from(["nchw", "cl"]),
       scale=st.floats(1e-3, 1.0), zp=st.integers(0, 255), seed=st.integers(0, 2**16))
def test_the_quantize_kernel_is_pytorchs_quantize_step_bit_for_bit(shape, layout, scale, zp, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 100 * scale
    x.view(-1)[::3] = (torch.randint(-300, 300, x.view(-1)[::3].shape, generator=g).float() + 0.5) * scale  # ties
    cl = len(shape) == 4
    if cl and layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    got = int8_amx.Quantize(scale, zp, cl)(x)
    want = int8.quantize_u8(x, scale, zp, cl)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    if cl:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("isa", ISAS)
@examples(20, suppress_health_check=[HealthCheck.too_slow])
@given(case=conv_cases, x_scale=st.floats(1e-3, 0.1), layout=st.sampled_from(["nchw", "cl", "strided"]))
def test_a_kernel_on_float_input_is_the_quantize_step_then_the_kernel_bit_for_bit(case, x_scale, layout, isa):
    """The quantize step a kernel does as it copies its float input in: every layout it may get, ties and
    saturation included, the same integers as quantize_u8 then the uint8 kernel."""
    if case["hw"] + 2 * min(case["pad"], case["k"] // 2 + 1) < case["k"]:
        return
    g, _, qw = _case(case)
    x = torch.randn(case["n"], case["c"], case["hw"], case["hw"], generator=g) * 200 * x_scale
    x.view(-1)[::3] = (torch.randint(-300, 300, x.view(-1)[::3].shape, generator=g).float() + 0.5) * x_scale  # ties
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # neither layout: a slice
        x = torch.cat([x, x], dim=3)[..., ::2]
    ws, b = torch.rand(case["o"], generator=g) * 0.01 + 1e-4, torch.randn(case["o"], generator=g)
    want = _kernel(qw, ws, b, x_scale, case, isa=isa)(int8.quantize_u8(x, x_scale, case["zp"], True))
    pad = min(case["pad"], case["k"] // 2 + 1)
    fused = int8_amx.Int8Kernel(qw, ws, b, x_scale, case["zp"], case["stride"], (pad, pad), 1.0, 0, False,
                                case["relu"], False, True, isa=isa, float_input=True)
    assert torch.equal(fused(x), want)


@pytest.mark.parametrize("isa", ISAS)
def test_a_linear_on_float_rows_quantizes_them_as_the_quantize_step_does(isa):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 96, generator=g)
    qw = torch.randint(-127, 128, (40, 96), generator=g).to(torch.int8)
    ws, b = torch.rand(40, generator=g) * 0.01 + 1e-4, torch.randn(40, generator=g)
    args = (qw, ws, b, 0.03, 77, 1, (0, 0), 1.0, 0, False, True, False, False)
    want = int8_amx.Int8Kernel(*args, isa=isa)(int8.quantize_u8(x, 0.03, 77))
    fused = int8_amx.Int8Kernel(*args, isa=isa, float_input=True)
    assert torch.equal(fused(x), want) and torch.equal(fused(x[:, :4]), want[:, :4])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("out_u8", [False, True])
def test_a_gelu_in_the_epilogue_is_pytorchs_gelu_within_float_rounding(approximate, out_u8, isa):
    """A transformer's FFN: the linear with its GELU in one kernel (erf's rational approximation, or the tanh
    form), against the float64 reference; requantized, within one step."""
    g = torch.Generator().manual_seed(4)
    qx = torch.randint(0, 256, (2, 9, 64), generator=g, dtype=torch.uint8)
    qw = torch.randint(-127, 128, (48, 64), generator=g).to(torch.int8)
    ws, b = torch.rand(48, generator=g) * 2e-3 + 1e-4, torch.randn(48, generator=g)  # y spans about ±6
    post = ("gelu", [], approximate)
    want = int8.linear_reference(qx, 0.05, 120, qw, ws, b, post=post)
    out = (float(want.abs().max()) / 127, 30) if out_u8 else (1.0, 0)
    kernel = int8_amx.Int8Kernel(qw, ws, b, 0.05, 120, 1, (0, 0), *out, out_u8, False, False, False, isa=isa,
                                 gelu=approximate)
    got = kernel(qx)
    if out_u8:
        want_q = int8.linear_reference(qx, 0.05, 120, qw, ws, b, post=post, out=out)
        assert int((got.int() - want_q.int()).abs().max()) <= 1
    else:
        assert float(want.abs().max()) > 3 and float((want < -0.1).float().mean()) > 0.1  # both sides of GELU
        assert torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@examples(15)
@given(k=st.sampled_from([16, 40, 128]), m=st.integers(1, 12), shift=st.floats(-3, 3), spread=st.floats(0.1, 10),
       seed=st.integers(0, 2**16))
def test_a_linear_normalizes_its_rows_as_layer_norm_then_quantizes_them(k, m, shift, spread, seed, isa):
    """A pre-norm transformer's LayerNorm (its affine folded into the linear) in the kernel's input copy: the
    same integers as F.layer_norm then the quantize step, but for a value within float rounding of a rounding
    boundary, which may land one step away."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g) * spread + shift
    qw = torch.randint(-127, 128, (24, k), generator=g).to(torch.int8)
    ws, b = torch.rand(24, generator=g) * 0.01 + 1e-4, torch.randn(24, generator=g)
    args = (qw, ws, b, 0.03, 128, 1, (0, 0), 1.0, 0, False, False, False, False)
    want = int8_amx.Int8Kernel(*args, isa=isa, float_input=True)(torch.nn.functional.layer_norm(x, (k,), eps=1e-5))
    got = int8_amx.Int8Kernel(*args, isa=isa, float_input=True, layer_norm_eps=1e-5)(x)
    one_step = 0.03 * ws * 127  # a flipped input step moves an output by at most this
    assert bool(((got - want).abs() <= one_step + 1e-5).all())
    assert float((got != want).float().mean()) <= 0.05


def test_the_graph_takes_a_layer_norm_without_affine_into_the_linear_it_feeds():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x):
            h = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
            return x + self.down(torch.relu(self.up(h))).reshape(h.shape)  # a shape query of the normalized value

    x = torch.randn(2, 5, 32)
    prog = int8_program(Block().eval(), x)
    generated = prog.clone()
    made = int8_amx.use_kernels(generated.gm)
    assert made[0].startswith("layer_norm+quantize+linear")
    assert not any(n.op == "call_function" and n.target is torch.nn.functional.layer_norm
                   for n in generated.gm.graph.nodes)  # its shape queries now read its input
    kernel = next(m for m in generated.gm.modules() if isinstance(m, int8_amx.Int8Kernel))
    assert kernel.ln_eps == 1e-6
    with torch.no_grad():
        for xs in (x, torch.randn(3, 7, 32)):
            want, got = prog.gm(xs), generated.gm(xs)
            assert float((got - want).norm() / want.norm()) < 2e-3


@pytest.mark.parametrize("isa", ISAS)
@examples(15)
@given(k=st.sampled_from([16, 40, 128]), m=st.integers(1, 12), zp=st.integers(0, 255), x_scale=st.floats(1e-3, 0.1),
       seed=st.integers(0, 2**16))
def test_a_linear_multiplies_its_float_input_per_channel_as_the_graph_does_bit_for_bit(k, m, zp, x_scale, seed, isa):
    """quantize's smoothing (a multiply by per-channel powers of two before the quantize step) in the kernel's
    input copy: the same float32 product, the same quantize, the same integers."""
    g = torch.Generator().manual_seed(seed)
    inv = torch.exp2(torch.randint(-5, 6, (k,), generator=g).float())
    x = torch.randn(2, m, k, generator=g) * 3 / inv
    qw = torch.randint(-127, 128, (24, k), generator=g).to(torch.int8)
    ws, b = torch.rand(24, generator=g) * 0.01 + 1e-4, torch.randn(24, generator=g)
    args = (qw, ws, b, x_scale, zp, 1, (0, 0), 1.0, 0, False, False, False, False)
    want = int8_amx.Int8Kernel(*args, isa=isa, float_input=True)(x * inv)
    got = int8_amx.Int8Kernel(*args, isa=isa, float_input=True, in_scale=inv)(x)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="one per input channel"):
        int8_amx.Int8Kernel(*args, isa=isa, float_input=True, in_scale=inv[:-1])


def test_the_graph_takes_a_smoothed_linear_s_multiply_and_layer_norm_into_its_kernel():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
            with torch.no_grad():
                self.up.weight[:, :3] *= 30  # columns that smoothing evens out

        def forward(self, x):
            h = torch.nn.functional.layer_norm(x, (32,), eps=1e-6)
            return x + self.down(torch.relu(self.up(h)))

    x = torch.randn(2, 5, 32)
    prog = int8_program(Block().eval(), x, smoothed=True)
    assert any(n.target is torch.ops.aten.mul.Tensor for n in prog.gm.graph.nodes), "up was smoothed"
    generated = prog.clone()
    made = int8_amx.use_kernels(generated.gm)
    assert made[0].startswith("layer_norm+scale+quantize+linear")
    assert not any(n.target is torch.ops.aten.mul.Tensor for n in generated.gm.graph.nodes)
    kernel = next(m for m in generated.gm.modules() if isinstance(m, int8_amx.Int8Kernel))
    assert kernel.xmul and kernel.ln_eps == 1e-6
    with torch.no_grad():
        for xs in (x, torch.randn(3, 7, 32)):
            want, got = prog.gm(xs), generated.gm(xs)
            assert float((got - want).norm() / want.norm()) < 2e-3
        copied = pickle.loads(pickle.dumps(generated.gm))  # the multipliers travel in the kernel's constants
        assert torch.equal(copied(x), generated.gm(x))


def test_the_graph_takes_a_residual_read_in_uint8_into_the_conv_s_epilogue():
    x = torch.randn(2, 3, 10, 10)
    prog = int8_program(ResidualBlock(head=False).eval(), x)
    assert any(n.target is int8.dequantize_u8 for n in prog.gm.graph.nodes)
    generated = prog.clone()
    made = int8_amx.use_kernels(generated.gm)
    assert "conv2d+add(u8)+relu" in made and made.count("quantize") == 0
    assert not any(n.target is int8.dequantize_u8 for n in generated.gm.graph.nodes)
    with torch.no_grad():
        for xs in (x, torch.randn(1, 3, 10, 10)):
            want, got = prog.gm(xs), generated.gm(xs)
            assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_a_kernel_whose_buffers_are_replaced_computes_with_the_new_ones():
    """The constant arguments are kept converted between calls: a buffer replaced (assigned, or moved by
    .to()) must not leave the kernel computing with the old one; one copied into in place is the same memory."""
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(0, 256, (9, 64), generator=g, dtype=torch.uint8)
    make = lambda seed: int8_amx.Int8Kernel(  # noqa: E731
        torch.randint(-127, 128, (32, 64), generator=torch.Generator().manual_seed(seed)).to(torch.int8),
        torch.full((32,), 0.01), torch.randn(32, generator=torch.Generator().manual_seed(seed)), 0.02, 5, 1,
        (0, 0), 1.0, 0, False, False, False, False)
    a, b = make(1), make(2)
    want_a, want_b = a(qx), b(qx)
    assert not torch.equal(want_a, want_b)
    a.wt, a.consts = b.wt.clone(), b.consts.clone()
    assert torch.equal(a(qx), want_b)
    c = make(1)
    c(qx)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c(qx), want_b)


def test_threads_calling_one_kernel_each_compute_their_own_input():
    """The padded input's buffer is kept per thread: two threads at once never read each other's."""
    import threading

    g = torch.Generator().manual_seed(0)
    qw = torch.randint(-127, 128, (32, 16, 3, 3), generator=g).to(torch.int8)
    kernel = int8_amx.Int8Kernel(qw, torch.full((32,), 0.01), None, 0.02, 3, 1, (1, 1), 1.0, 0, False, False,
                                 False, True)
    xs = [torch.randint(0, 256, (1, 16, 12, 12), generator=g, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last) for _ in range(2)]
    wants = [kernel(x) for x in xs]
    bad = []

    def run(i):
        for _ in range(300):
            if not torch.equal(kernel(xs[i]), wants[i]):
                bad.append(i)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


class Net(nn.Module):
    def __init__(self, c: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)
        self.c = nn.Conv2d(c, c, 1, stride=2)
        self.head = nn.Linear(c * 4 * 4, 10)

    def forward(self, x):
        y = torch.relu(self.a(x))
        z = torch.relu(self.b(y) + y)
        return self.head(torch.flatten(torch.relu(self.c(z)), 1))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_the_graph_runs_the_generated_kernels_and_computes_what_the_operators_compute(method):
    x = torch.randn(2, 3, 8, 8)
    prog = int8_program(Net().eval(), x, method)
    before = [(n.name, n.target, n.args) for n in prog.gm.graph.nodes]
    generated = prog.clone()
    made = int8_amx.use_kernels(generated.gm)
    assert [(n.name, n.target, n.args) for n in prog.gm.graph.nodes] == before
    assert any("conv2d+add" in k and "+relu" in k for k in made) and any("linear" in k for k in made)
    # the first conv reads the model's float input: it quantizes it itself, no quantize step is left
    assert made[0].startswith("quantize+conv2d") and "quantize" not in made
    assert not any(isinstance(m, int8_amx.Quantize) for m in generated.gm.modules())
    # the cost model (early exit's cuts, the roofline) counts each kernel's multiply-adds at the int8 rate
    from optic.pipeline import cost

    first = next(n for n in generated.gm.graph.nodes if n.op == "call_module")
    c = cost.node_cost(first, generated.gm)
    assert c is not None and c.dtype == "int8" and c.flops == 2 * 2 * 16 * 8 * 8 * 3 * 3 * 3
    left = [n for n in generated.gm.graph.nodes if n.op == "call_function"
            and (n.target in int8.OUT_ARGS or n.target is int8.quantize_u8)]
    assert not left
    with torch.no_grad():
        for xs in (x, torch.randn(5, 3, 8, 8)):  # the example's batch and another one
            want, got = prog.gm(xs), generated.gm(xs)
            assert float((got - want).norm() / want.norm()) < 2e-3
        clone = copy.deepcopy(generated.gm)
        loaded = pickle.loads(pickle.dumps(generated.gm))
        assert torch.equal(clone(x), generated.gm(x)) and torch.equal(loaded(x), generated.gm(x))


def test_the_cpu_step_offers_the_generated_kernels_and_checks_them(monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    prog = int8_program(Net().eval(), x)
    ctx = PassContext(target=targets.get("cpu"), measure=True, options={"whole_graph": False})
    ctx.check_inputs = [((x,), {})]
    ctx.tolerance = 1e-2
    from optic.ir.rewrite import RuleStats
    from optic.pipeline.report import PassRecord

    ctx.stats, ctx.record = RuleStats(), PassRecord("cpu_tactics", True)
    found = get("cpu_tactics")._int8_generated(prog, ctx)
    # this example's calls are all small: no variant with the pool (it would be the one-thread one)
    assert list(found) == [whole.INT8_GENERATED]
    rules = found[whole.INT8_GENERATED][1]
    assert rules and all(k.startswith("int8_generated_") for k in rules)
    monkeypatch.setattr(int8_amx, "PARALLEL_MACS", 1)  # every call large: the pool's variant, checked, beside it
    found = get("cpu_tactics")._int8_generated(prog, ctx)
    assert list(found) == [whole.INT8_GENERATED, whole.INT8_GENERATED_POOL]
    pooled = [m for m in found[whole.INT8_GENERATED_POOL][0].gm.modules() if isinstance(m, int8_amx.Int8Kernel)]
    assert pooled and all(m.parallel_macs == 1 and all(k[-1] for k in m._fns) for m in pooled)
    with torch.no_grad():
        assert torch.equal(found[whole.INT8_GENERATED_POOL][0].gm(x), found[whole.INT8_GENERATED][0].gm(x))
    monkeypatch.setenv(int8_amx.ENV, "0")
    ctx.stats = RuleStats()
    assert get("cpu_tactics")._int8_generated(prog, ctx) == {}
    assert any(r == "int8_generated" and "switched off" in why for r, _, why in ctx.stats.declined)


def test_the_allocator_times_int8_with_the_generated_kernels_where_the_cpu_step_offers_them(monkeypatch):
    ctx = PassContext(target=targets.get("cpu"), measure=True)
    step, lossy = get("cpu_tactics"), get("early_exit")
    assert whole.will_generate(ctx, [step, lossy])
    assert not whole.will_generate(ctx, [lossy])
    assert not whole.will_generate(PassContext(target=targets.get("a100"), measure=True), [step])
    monkeypatch.setenv(int8_amx.ENV, "0")
    assert not whole.will_generate(ctx, [step])


def test_register_blocks_fit_the_registers():
    for fp in (16, 32, 48, 64, 128):
        for mb, nb in int8_amx.configs(fp, "amx"):
            assert mb + nb + mb * nb <= int8_amx.TILES and fp % (16 * nb) == 0
        for mb, nb in int8_amx.configs(fp, "vnni"):
            assert mb * nb + nb + 1 <= int8_amx.VECTOR_REGISTERS and mb <= 8 and fp % (16 * nb) == 0
            assert mb * nb * int8_amx.ROW_BYTES < int8_amx.STACK_BYTES
    assert int8_amx.configs(32, "amx")[0] == (2, 2)
    assert int8_amx.configs(64, "vnni")[0] == (3, 4) and int8_amx.configs(32, "vnni")[0] == (7, 2)


def test_the_vnni_accumulators_stay_in_registers():
    # compiled, not run (any x86 host): the reduction loop is vpdpbusd on register accumulators, with no store and
    # no heap buffer; with the accumulators on TVM's heap workspace each vpdpbusd stored its accumulator and the
    # broadcast input was loaded again for each (38 against 95-156 GMAC/s on one Zen 4 core)
    import re

    import tvm

    sp = int8_amx.Spec(8, 8, 64, 64, 3, 3, 1, 1, 1, True, True, False, *int8_amx.configs(64, "vnni")[0], "vnni")
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4", "mattr": ["+avx512vnni", "+avx512f", "+avx512bw"]})
    asm = tvm.compile(tvm.IRModule({"main": int8_amx._prim_func(sp)}), target=target).mod.inspect_source("asm")
    lines = [ln.strip() for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith(".")]
    fmas = [i for i, ln in enumerate(lines) if ln.startswith("vpdpbusd")]
    assert len(fmas) >= 12  # the 3 x 4 register tile, unrolled
    loop = lines[fmas[0]:fmas[11] + 1]  # the first 12 multiply-adds, and what runs between them
    stores = [ln for ln in loop if re.match(r"vmov\w+\s+%[xyz]mm\d+, .*\(", ln)]
    assert not stores, stores
    assert "TVMBackendAllocWorkspace@" not in asm


def test_the_isa_is_chosen_from_the_cpu_and_can_be_forced_to_vnni(monkeypatch):
    assert int8_amx.pick_isa() in int8_amx.ISAS
    monkeypatch.setenv(int8_amx.ISA_ENV, "vnni")
    assert int8_amx.pick_isa() == "vnni"


@pytest.mark.parametrize("isa", ISAS)
def test_tensors_at_any_address_are_read_and_written_where_they_are(isa):
    """Views that start mid-allocation (the rows early exit keeps, a slice of a batch) are not 64-byte
    aligned: a kernel that assumed so would fault on an aligned vector load, or read the wrong bytes."""
    case = {"n": 3, "c": 64, "o": 32, "hw": 6, "k": 3, "stride": 1, "pad": 1, "zp": 5, "relu": False, "seed": 9}
    g, qx, qw = _case(case)
    ws, b = torch.rand(32, generator=g) * 0.01 + 1e-4, torch.randn(32, generator=g)
    kernel = _kernel(qw, ws, b, 0.02, case, residual=True, isa=isa)
    big_x = torch.cat([qx[:1], qx]).contiguous(memory_format=torch.channels_last)
    r = torch.randn(4, 32, 6, 6, generator=g).contiguous(memory_format=torch.channels_last)
    for start in range(1, 4):  # channels-last rows of 64 bytes and float rows: offsets of whole images
        x_view = big_x.as_strided(qx.shape, qx.stride(), start)
        r_view = r.as_strided((3, 32, 6, 6), r.stride(), start)
        assert x_view.data_ptr() % 64 and r_view.data_ptr() % 64
        want = _reference(x_view.contiguous(), 0.02, 5, qw, ws, b, case) + r_view.double()
        got = kernel(x_view, r_view)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    x = torch.randn(3000, generator=g)
    for start in range(1, 17):
        view = x[start:start + 2048]
        assert torch.equal(int8_amx.Quantize(0.05, 3, False)(view), int8.quantize_u8(view, 0.05, 3))


def test_a_kernel_for_instructions_this_cpu_lacks_is_refused_with_what_to_do(monkeypatch):
    """A saved model carries its kernels' instruction set; loaded on a CPU without it, building the kernel
    must raise (running it would kill the process)."""
    qw = torch.randint(-127, 128, (16, 8, 3, 3)).to(torch.int8)
    kernel = int8_amx.Int8Kernel(qw, torch.ones(16), None, 1.0, 0, 1, (1, 1), 1.0, 0, False, False, False, True,
                                 isa=ISAS[0])
    monkeypatch.setattr(int8_amx, "unavailable", lambda isa=None: "this CPU has no such instructions")
    with pytest.raises(RuntimeError, match="Optimize the model again"):
        kernel(torch.randint(0, 256, (1, 8, 5, 7), dtype=torch.uint8))  # a size not built before
