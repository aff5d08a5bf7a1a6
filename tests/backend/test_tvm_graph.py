"""The whole graph as one TVM program of optic's kernels (optic.backend.tvm_graph).

Property: any CNN it accepts computes what the model computes, on the example and on other inputs of
the example's shapes; every other call runs the plain graph. Plus the layouts (NHWC inside, transposes
only where a consumer needs NCHW), the declines, and the program's travels (pickle, deepcopy).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import examples

pytest.importorskip("tvm")

from optic.backend import tvm_graph  # noqa: E402
from optic.pipeline.verify import compare  # noqa: E402

ACTS = [None, "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu"]


def _act(name):
    return {None: nn.Identity(), "relu": nn.ReLU(), "relu6": nn.ReLU6(), "gelu": nn.GELU(), "silu": nn.SiLU(),
            "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "hardtanh": nn.Hardtanh(-0.5, 0.5), "hardswish": nn.Hardswish(),
            "hardsigmoid": nn.Hardsigmoid(), "leaky_relu": nn.LeakyReLU(0.2)}[name]


class Block(nn.Module):
    def __init__(self, kind, c, c_out, act, stride, residual):
        super().__init__()
        if kind == "dw":
            self.conv = nn.Conv2d(c, c, 3, stride, 1, groups=c)
        elif kind == "conv1x1":
            self.conv = nn.Conv2d(c, c_out, 1, stride)
        else:
            self.conv = nn.Conv2d(c, c_out, 3, stride, 1, bias=stride == 1)
        self.act, self.residual = _act(act), residual

    def forward(self, x):
        y = self.conv(x)
        if self.residual:
            return self.act(y + x)
        return self.act(y)


class TFPad(nn.Module):
    """TensorFlow's "same" padding before a stride-2 convolution: one more row and column after than before."""

    def __init__(self, c, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c, c_out, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Concat(nn.Module):
    """Two branches joined along the channels (Inception, DenseNet)."""

    def __init__(self, c, c_out):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c_out, 1), nn.Conv2d(c, c, 3, 1, 1, groups=c)

    def forward(self, x):
        return torch.cat([self.a(x), torch.relu(self.b(x))], dim=1)


class Net(nn.Module):
    def __init__(self, blocks, head, c, classes, hw):
        super().__init__()
        self.blocks, self.head = nn.ModuleList(blocks), head
        self.fc = nn.Linear(c * (1 if head != "flatten" else hw * hw), classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if self.head == "adaptive":
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        elif self.head == "mean":
            x = x.mean(dim=(2, 3))
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


@st.composite
def cnn_and_input(draw):
    hw = draw(st.sampled_from([8, 9, 12]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    c, size, blocks = 3, hw, []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv1x1", "conv3x3", "dw", "residual", "maxpool", "avgpool", "tfpad", "concat"]))
        if kind == "tfpad" and size >= 4:
            c_out = draw(st.sampled_from([4, 8]))
            blocks.append(TFPad(c, c_out))
            c, size = c_out, size // 2
            continue
        if kind == "concat":
            c_out = draw(st.sampled_from([4, 8]))
            blocks.append(Concat(c, c_out))
            c = c + c_out
            continue
        if kind in ("maxpool", "avgpool", "tfpad"):
            if size < 4:
                continue
            blocks.append(nn.MaxPool2d(3, 2, 1) if kind == "maxpool" else nn.AvgPool2d(2))
            size = (size - 1) // 2 + 1 if kind == "maxpool" else size // 2
            continue
        act = draw(st.sampled_from(ACTS))
        if kind == "residual":
            blocks.append(Block(draw(st.sampled_from(["conv1x1", "conv3x3", "dw"])), c, c, act, 1, True))
            continue
        stride = draw(st.sampled_from([1, 1, 2])) if size >= 4 else 1
        c_out = c if kind == "dw" else draw(st.sampled_from([4, 8, 16, 20]))
        blocks.append(Block(kind, c, c_out, act, stride, False))
        c, size = c_out, (size - 1) // stride + 1
    head = draw(st.sampled_from(["adaptive", "mean", "flatten"]))
    model = Net(blocks, head, c, draw(st.sampled_from([5, 10])), size).eval()
    return model, torch.randn(draw(st.integers(1, 2)), 3, hw, hw)


def _flat(model: nn.Module) -> fx.GraphModule:
    """The model's graph as the whole-graph implementations take it (whole.wrap): its outputs as a tuple."""
    gm = fx.symbolic_trace(model)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0],),)
    gm.recompile()
    return gm


def _built(model: nn.Module, x: torch.Tensor) -> tvm_graph.TVMGraph:
    g = tvm_graph.TVMGraph(_flat(model))
    g.build((x,), 0)
    return g


@examples(10)
@given(case=cnn_and_input())
def test_a_compiled_cnn_computes_what_the_model_computes(case):
    model, x = case
    g = _built(model, x)
    assert g.kernels and all(k.name for k in g.kernels)
    with torch.no_grad():
        for inp in (x, torch.randn_like(x) * 3):
            check = compare(model(inp), g(inp)[0], 1e-4)
            assert check.ok, check


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.ReLU(),
                         nn.Conv2d(16, 32, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_activations_stay_nhwc_between_convolutions_and_epilogues_fuse():
    g = _built(_chain(), torch.randn(1, 3, 16, 16))
    kinds = [k.what for k in g.kernels]
    # the input transposed once; the pooled 1x1 value is the same memory in both layouts: no transpose back
    assert kinds.count("NCHW -> NHWC") == 1 and "NHWC -> NCHW" not in kinds, kinds
    templates = [k.what for k in g.kernels if k.source == "template"]
    # the 3x3 stem: the direct (NHWCc) and the implicit-GEMM (NHWC) templates both considered, one kept
    stem = [w for w in templates if w.startswith("conv2d ")]
    assert len(stem) == 1 and "+ bias+relu6" in stem[0] and "(chosen over " in stem[0], stem
    assert any(w.startswith("depthwise conv2d") and "+ bias+relu" in w for w in templates), templates
    assert any(w.startswith("matmul 64x32x16 (B packed) + bias") for w in templates), templates  # 1x1 conv: a GEMM
    assert sum(k.source == "simple" for k in g.kernels) == 2  # the transpose and the global average


def test_a_convolution_output_returned_whole_is_transposed_back_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 7, 7)
    g = _built(model, x)
    assert [k.what for k in g.kernels].count("NHWC -> NCHW") == 1
    with torch.no_grad():
        out = g(x)[0]
        assert out.is_contiguous() and compare(model(x), out, 1e-5).ok


def test_calls_the_program_does_not_serve_give_the_models_result():
    model = _chain()
    x = torch.randn(2, 3, 16, 16)
    g = _built(model, x)
    with torch.no_grad():
        other = torch.randn(3, 3, 16, 16)  # another batch size: the program serves the example's shapes only
        assert compare(model(other), g(other)[0], 1e-5).ok
    xg = x.clone().requires_grad_()
    out = g(xg)[0]
    assert out.grad_fn is not None  # gradients wanted: PyTorch's ops ran
    # a weight edited in place after the build: the program is stale, Inductor's program answers from now on
    conv = g.graph_module.get_submodule("0")
    with torch.no_grad():
        conv.weight.mul_(2.0)
        expected = g.graph_module(x)[0]
        assert compare(expected, g(x)[0], 1e-5).ok
    assert g.failed and "weight changed" in g.failed


def test_the_program_travels_with_pickle_and_deepcopy_without_a_rebuild(monkeypatch):
    model = _chain()
    x = torch.randn(1, 3, 16, 16)
    g = _built(model, x)
    monkeypatch.setattr(tvm_graph.TVMGraph, "build", lambda *a, **k: pytest.fail("rebuilt"))
    with torch.no_grad():
        expected = model(x)
        for other in (pickle.loads(pickle.dumps(g)), copy.deepcopy(g)):
            got = other(x)[0]
            assert other.failed is None and compare(expected, got, 1e-5).ok


def test_a_graph_with_an_op_without_a_kernel_is_declined_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.GroupNorm(2, 8)).eval()
    why = tvm_graph.check(fx.symbolic_trace(model))
    assert why is not None and "'_2'" in why and "group_norm" in why
    # what only shapes tell is found while lowering: a grouped (not depthwise) convolution
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)).eval()
    assert tvm_graph.check(fx.symbolic_trace(grouped)) is None
    with pytest.raises(tvm_graph.Unsupported, match="grouped convolution"):
        _built(grouped, torch.randn(1, 4, 8, 8))


def test_optimize_offers_the_program_and_keeps_the_fastest_verified_one():
    import optic

    model = _chain()
    x = torch.randn(1, 3, 32, 32)
    out = optic.optimize(model, x, options={"whole_graph": "tvm"})
    rec = next(r for r in out.report.passes if r.name == "cpu_tactics")
    assert tvm_graph.NAME in rec.measured["variants_ms"]
    assert any(k["source"] == "template" for k in rec.measured["tvm_kernels"])
    with torch.no_grad():
        for inp in (x, torch.randn(1, 3, 32, 32), torch.randn(4, 3, 32, 32)):
            assert compare(model(inp), out(inp), 1e-4).ok


def test_the_kernel_table_times_every_kernel_once_per_call():
    g = _built(_chain(), torch.randn(1, 3, 16, 16))
    rows = g.profile((torch.randn(1, 3, 16, 16),))
    assert sorted(r.name.split(":")[0] for r in rows) == sorted(k.name for k in g.kernels)
    assert all(r.calls == 1 and r.ms > 0 for r in rows)
    assert {r.source for r in rows} == {"generated (optic, TVM template)", "generated (optic, TVM)"}
    assert g.profile((torch.randn(2, 3, 16, 16),)) == []  # a shape the program does not serve
    with torch.no_grad():  # the hook is gone: the program runs as before
        assert compare(g.graph_module(torch.ones(1, 3, 16, 16))[0], g(torch.ones(1, 3, 16, 16))[0], 1e-5).ok


def test_an_exported_graph_is_lowered_like_a_traced_one():
    """Both capture paths are first-class: the ATen graph torch.export makes (aten.conv2d, aten.hardtanh,
    aten.adaptive_avg_pool2d, aten.linear) lowers to the same kernels."""
    import optic

    model = _chain()
    x = torch.randn(1, 3, 32, 32)
    out = optic.optimize(model, x, capture="export", options={"whole_graph": "tvm"})
    rec = next(r for r in out.report.passes if r.name == "cpu_tactics")
    assert tvm_graph.NAME in rec.measured["variants_ms"], out.report
    kinds = sorted(k["what"].split(" ")[0] for k in rec.measured["tvm_kernels"] if k["source"] == "template")
    assert kinds == ["conv2d", "depthwise", "matmul", "matmul"], kinds
    with torch.no_grad():
        assert compare(model(x), out(x), 1e-4).ok


def test_tf_padding_concatenation_and_hard_activations_compute_what_the_model_computes():
    torch.manual_seed(3)
    model = nn.Sequential(TFPad(3, 8), nn.Hardswish(), Concat(8, 4), nn.Hardsigmoid(), nn.LeakyReLU(0.1),
                          nn.Conv2d(12, 6, 1), nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).eval()
    x = torch.randn(2, 3, 17, 17)
    g = _built(model, x)
    whats = [k.what for k in g.kernels]
    assert "pad" in whats and "concatenation" in whats and "hardswish" in whats, whats
    assert whats.count("NHWC -> NCHW") == 1  # only before the flatten: pad and concatenation stay NHWC
    with torch.no_grad():
        for inp in (x, torch.randn_like(x)):
            assert compare(model(inp), g(inp)[0], 1e-4).ok


class _InplaceReadAgain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu_(y)  # y itself is now relu'd: the add reads the changed tensor
        return z + y * 2


def test_an_in_place_op_whose_input_is_read_again_is_declined():
    why = tvm_graph.check(fx.symbolic_trace(_InplaceReadAgain()))
    assert why is not None and "in place" in why
    # an in-place activation nothing else reads is computed out of place, the same result
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 1)).eval()
    assert tvm_graph.check(fx.symbolic_trace(model)) is None
    x = torch.randn(1, 3, 6, 6)
    g = _built(model, x)
    with torch.no_grad():
        assert compare(model(x), g(x)[0], 1e-5).ok


def test_a_value_two_consumers_need_in_the_other_layout_is_transposed_once():
    torch.manual_seed(4)
    model = Concat(3, 4).eval()  # the input feeds a 1x1 and a depthwise convolution
    x = torch.randn(1, 3, 9, 9)
    g = _built(model, x)
    whats = [k.what for k in g.kernels]
    assert whats.count("NCHW -> NHWC") == 1 and whats.count("NHWC -> NCHW") == 1, whats
    with torch.no_grad():
        assert compare(model(x), g(x)[0], 1e-5).ok


class _Encoder(nn.Module):
    """A pre-norm encoder layer with attention written out (q·kᵀ, softmax, p·v), or through
    ``F.scaled_dot_product_attention`` with a fused q/k/v projection split in three; a token mean and a head."""

    def __init__(self, d=32, heads=4, sdpa=False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.norm1, self.norm2, self.norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d, elementwise_affine=False)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for a in (q, k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1), v)
        x = x + self.out(y.permute(0, 2, 1, 3).reshape(b, t, d))
        x = x + self.ffn(self.norm2(x))
        return self.head(self.norm(x.mean(dim=1)))


@pytest.mark.parametrize("sdpa", [False, True])
def test_a_transformer_layer_is_one_program_computing_what_the_model_computes(sdpa):
    """LayerNorm, softmax, the attention products, transposes, a split and a token mean have kernels too."""
    torch.manual_seed(0)
    model = _Encoder(sdpa=sdpa).eval()
    x = torch.randn(2, 7, 32)
    g = _built(model, x)
    whats = " | ".join(k.what for k in g.kernels)
    assert "LayerNorm" in whats and "softmax" in whats and "mean over [1]" in whats, whats
    with torch.no_grad():
        for inp in (x, torch.randn_like(x) * 3):
            check = compare(model(inp), g(inp)[0], 1e-4)
            assert check.ok, check


def test_a_softmax_over_another_dimension_is_declined_naming_it():
    class M(nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=1)
    with pytest.raises(tvm_graph.Unsupported, match="softmax over dim 1"):
        _built(M(), torch.randn(2, 3, 4))


def test_shape_queries_are_constants_of_the_example_not_a_decline():
    """``b, t, d = x.shape`` in a traced model: accepted by the check, lowered as the example's sizes."""
    gm = fx.symbolic_trace(_Encoder().eval())
    assert any(n.op == "call_function" and n.target is getattr for n in gm.graph.nodes)
    assert tvm_graph.check(gm) is None


def test_an_input_that_does_not_start_on_a_64_byte_boundary_is_served_right():
    """A slice of a larger tensor (or one made from a NumPy array) starts anywhere; TVM's kernels load their
    buffers with aligned vector loads, and such an input killed the process."""
    model = _chain()
    x = torch.randn(1, 3, 16, 16)
    g = _built(model, x)
    buf = torch.randn(x.numel() + 16)
    with torch.no_grad():
        for offset in (1, 4, 8):
            xi = buf[offset:offset + x.numel()].view(1, 3, 16, 16)
            assert xi.data_ptr() % 64 != 0
            assert compare(model(xi), g(xi)[0], 1e-5).ok
