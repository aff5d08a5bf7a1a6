"""optic.lower: Program -> TVM Relax -> fused kernels, with the ops TVM cannot take kept in PyTorch.

Lowering imports, fuses and builds with TVM (seconds per model on a small machine), so each model is
lowered once per module (fixtures) and the models are tiny.
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install 'optic[tvm]'); lowering needs it")

import optic  # noqa: E402
from optic import tvm_compat  # noqa: E402
from optic.backend.inspect import scheduled_kernel, tvm_view  # noqa: E402
from optic.backend.partition import convex_groups, extract  # noqa: E402
from optic.errors import LoweringError, OpticError, UnknownTargetError  # noqa: E402
from optic.pipeline.verify import compare  # noqa: E402

lowering = importlib.import_module("optic.backend.lower")

def agrees(model: nn.Module, lowered: optic.Lowered, *inputs: torch.Tensor) -> bool:
    with torch.no_grad():
        c = compare(model(*inputs), lowered.module()(*inputs), 1e-4)
    assert c.ok, str(c)
    return c.ok


def by_class(lowered: optic.Lowered, cls: str) -> list:
    return [k for k in lowered.kernels if k.op_class == cls]


# -- models ------------------------------------------------------------------------------------------------
class ResBlockCNN(nn.Module):
    """conv-BN-ReLU, then conv-BN + residual + ReLU, global mean, linear (BN not folded)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():  # statistics far from the identity, so a wrong BN shows
            for bn in (self.b1, self.b2):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.3, 3.0)
                bn.weight.normal_()
                bn.bias.normal_()

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        return self.fc(y.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.l2(F.gelu(self.l1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention as matmul + softmax, GELU MLP, residuals."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(d, -1))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


@torch.library.custom_op("optic_test_lower::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@twice.register_fake
def _(x):
    return torch.empty_like(x)


class Unsupported(nn.Module):
    """A custom op and a bool cumsum (Whisper-style positions) between ops TVM takes."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        positions = (x != 1).cumsum(-1)
        return torch.sigmoid(self.l2(twice(torch.relu(self.l1(x))) + positions))


class Attention(nn.Module):
    """Causal SDPA (TVM imports it) and SDPA with a bool mask (TVM's importer takes float masks only)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = (z.view(1, 5, 2, 8).transpose(1, 2) for z in self.qkv(x).split(16, -1))
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return (causal + masked).transpose(1, 2).reshape(1, 5, 16)


class Wrong(nn.Module):
    """Ops the importer has a conversion for but gets wrong, when the known-gap rules are off: a bool
    cumsum typed bool (caught at import) and SDPA whose scale= it ignores (caught by the numerics)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        q = self.q(x).view(1, 4, 2, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, scale=0.25).transpose(1, 2).reshape(1, 4, 8)  # not 4**-0.5
        return a + (x != 0).cumsum(-1)


def lowered_model(model: nn.Module, x: torch.Tensor, target="cpu", method="auto"):
    model.eval()
    return model, x, optic.lower(optic.capture(model, (x,), method=method), target)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return lowered_model(ResBlockCNN(), torch.randn(2, 3, 8, 8))


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    return lowered_model(MLP(), torch.randn(4, 16))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(2)
    return lowered_model(Block(), torch.randn(2, 5, 16), method="export")


@pytest.fixture(scope="module")
def unsupported():
    torch.manual_seed(3)
    x = torch.randn(3, 6)
    x[0, 1] = 1.0  # so that x != 1 is not all true
    return lowered_model(Unsupported(), x)


# -- conv + BN + ReLU ---------------------------------------------------------------------------------------
def test_cnn_with_batch_norm_runs_like_eager(cnn):
    model, x, lowered = cnn
    assert lowered.fallbacks == []
    assert agrees(model, lowered, x)
    assert agrees(model, lowered, torch.randn_like(x))  # not just the example it was checked on


def test_cnn_kernels_have_conv_workloads(cnn):
    _, _, lowered = cnn
    convs = by_class(lowered, "conv2d")
    assert [(k.workload.inputs[0].shape, k.workload.inputs[1].shape) for k in convs] == [
        ((2, 3, 8, 8), (8, 3, 3, 3)), ((2, 8, 8, 8), (8, 8, 3, 3))]
    assert all(k.workload.outputs[0].shape == (2, 8, 8, 8) and k.workload.outputs[0].dtype == "float32"
               for k in convs)
    first, second = (k.workload for k in convs)
    assert dict(first.attrs)["strides"] == [1, 1] and dict(first.attrs)["padding"] == [1, 1, 1, 1]
    assert first.epilogue[-1] == "relu" and "residual" not in first.epilogue
    assert second.epilogue[-2:] == ("residual", "relu")  # BN's shift, the skip connection, ReLU, all fused
    assert [k.workload.op for k in by_class(lowered, "reduction")] == ["mean"]
    (fc,) = by_class(lowered, "matmul")
    assert fc.workload.epilogue == ("bias",) and fc.workload.inputs[1].shape == (8, 4)


def test_kernel_keys_are_stable_database_keys(cnn):
    _, _, lowered = cnn
    keys = [k.workload.key for k in lowered.kernels]
    assert len(set(keys)) == len(keys) and all(len(k) == 24 for k in keys)
    # the key depends on what the kernel computes, not on its name
    k = lowered.kernels[0]
    assert k.workload.key == type(k.workload)(**{**k.workload.__dict__}).key


def test_one_partition_and_zero_copy_dlpack(cnn):
    _, x, lowered = cnn
    assert [p.name for p in lowered.partitions] == ["part_0"]
    code = lowered.module().code
    assert "tvm_part_0" in code and "convolution" not in code  # the whole model runs in TVM
    t = torch.randn(4, 4)
    assert tvm_compat.to_torch(tvm_compat.to_tvm(t)).data_ptr() == t.data_ptr()


def test_scripts(cnn):
    _, _, lowered = cnn
    text = lowered.script()
    assert "def part_0(" in text and "R.nn.conv2d" in text
    assert "R.call_tir" not in text and "call_tir" in lowered.script(fused=True)
    name = by_class(lowered, "conv2d")[0].name
    assert "@T.prim_func" in lowered.kernel_script(name)
    with pytest.raises(OpticError, match="no kernel named 'nope'"):
        lowered.kernel_script("nope")


# -- matmul + bias + GELU ------------------------------------------------------------------------------------
def test_matmul_bias_gelu_epilogue(mlp):
    model, x, lowered = mlp
    assert agrees(model, lowered, x)
    first, second = by_class(lowered, "matmul")
    w = first.workload
    assert (w.op, w.inputs[0].shape, w.inputs[1].shape, w.outputs[0].shape) == ("matmul", (4, 16), (16, 32), (4, 32))
    assert w.epilogue == ("bias", "gelu")
    assert second.workload.epilogue == ("bias",)
    assert w.template_args() == ("matmul", (4, 32, 16), {"dtype": "float32", "epilogue": ("bias", "gelu")})


def test_gpu_target_lists_the_same_kernels(mlp):
    model, x, lowered = mlp
    gpu = optic.lower(optic.capture(model, (x,)), "h100")
    assert gpu.target.kind.name == "cuda" and gpu.build_target.kind.name == "llvm"
    assert [k.workload.key for k in gpu.kernels] == [k.workload.key for k in lowered.kernels]  # deterministic
    assert agrees(model, gpu, x)


def test_tvmscript_dump(mlp):
    from optic import dump

    model, x, lowered = mlp
    program = optic.capture(model, (x,))
    text = dump.render(program, "tvmscript", title="captured graph", tvm=tvm_view(program))
    assert text.startswith("# optic TVMScript dump: captured graph")
    assert "fused_matmul_add_gelu: matmul" in text and "def part_0(" in text
    # and the whole program of optic's kernels the CPU step would build: each kernel, then its Relax function
    whole = text.split("# the whole graph as one program of optic's kernels", 1)[1]
    assert "matmul 4x32x16 (B packed) + bias+gelu" in whole and "matmul 4x8x32 (B packed) + bias" in whole
    assert "R.call_tir" in whole
    name = by_class(lowered, "matmul")[0].name
    one = dump.render(program, "tvmscript", tvm=tvm_view(program, "cpu", name))
    assert f"# kernel {name}" in one and "def part_0(" not in one
    # then the same kernel scheduled by optic's template: its variables in the header, parallel loops in the TIR
    assert "# scheduled by optic's matmul template for cpu" in one and "MR=" in one and "NR=" in one
    assert one.count("def main(") == 2


def test_scheduled_kernel_for_a_gpu_binds_threads_or_says_why(block):

    _, _, lowered = block
    texts = [scheduled_kernel(k, "a100") for k in lowered.kernels]
    assert any("scheduled by optic's" in t for t in texts)
    for text in texts:
        assert text.startswith("# ")
        if "scheduled by optic's" in text:
            assert "thread_binding" in text and "blockIdx" in text
        else:
            assert "no optic template" in text or "cannot schedule" in text


# -- transformer block -----------------------------------------------------------------------------------------
def test_transformer_block(block):
    model, x, lowered = block
    assert lowered.fallbacks == []
    assert agrees(model, lowered, x)
    reductions = {k.workload.op: k.calls for k in by_class(lowered, "reduction")}
    assert reductions == {"layer_norm": 2, "softmax": 1}  # both layer norms call one kernel
    matmuls = by_class(lowered, "matmul")
    assert sum(k.calls for k in matmuls) == 6  # qkv, q@k, @v, proj, up, down
    assert sum(k.calls for k in matmuls if k.workload.epilogue[:1] == ("bias",)) == 4
    batched = [k for k in matmuls if len(k.workload.inputs[1].shape) == 3]
    assert [k.workload.inputs[0].shape for k in batched] == [(4, 5, 8), (4, 5, 5)]


# -- ops TVM cannot take --------------------------------------------------------------------------------------------
def test_unsupported_ops_stay_in_pytorch_all_listed(unsupported):
    model, x, lowered = unsupported
    reasons = {f.op: f.reason for f in lowered.fallbacks}
    assert set(reasons) == {"aten.cumsum.default", "optic_test_lower.twice.default"}
    assert "bool" in reasons["aten.cumsum.default"]
    assert "custom op optic_test_lower::twice" in reasons["optic_test_lower.twice.default"]
    assert any(f.source and f.source.endswith("test_lower.py:" + str(Unsupported.forward.__code__.co_firstlineno + 1))
               for f in lowered.fallbacks)
    # the rest still lowers: both linears (with bias and ReLU / sigmoid fused) run in TVM
    assert [k.workload.epilogue for k in by_class(lowered, "matmul")] == [("bias", "relu"), ("bias", "sigmoid")]
    assert agrees(model, lowered, x)
    assert "optic_test_lower.twice" in lowered.module().code and "tvm_part_" in lowered.module().code


def test_sdpa_goes_to_tvm_unless_its_mask_is_bool():
    torch.manual_seed(4)
    model, x, lowered = lowered_model(Attention(), torch.randn(1, 5, 16))
    assert [f.op for f in lowered.fallbacks] == ["aten.scaled_dot_product_attention.default"]
    assert "float attn_mask" in lowered.fallbacks[0].reason
    assert [k.workload.op for k in lowered.kernels if k.workload.op == "attention"] == ["attention"]
    assert agrees(model, lowered, x)


def test_ops_tvm_gets_wrong_are_found_by_bisection(monkeypatch):
    """Without the known-gap rules, import type checks and per-partition numerics find the same ops."""
    monkeypatch.setattr(lowering, "KNOWN_GAPS", [])
    torch.manual_seed(5)
    model, x, lowered = lowered_model(Wrong(), torch.randn(1, 4, 8))
    reasons = {f.op: f.reason for f in lowered.fallbacks}
    assert set(reasons) == {"aten.cumsum.default", "aten.scaled_dot_product_attention.default"}
    assert reasons["aten.cumsum.default"].startswith("TVM's importer gets the result type wrong: bool[")
    assert reasons["aten.scaled_dot_product_attention.default"].startswith("TVM's result differs from PyTorch's")
    assert by_class(lowered, "matmul") and agrees(model, lowered, x)


# -- errors ---------------------------------------------------------------------------------------------------
def test_unknown_target_kind():
    with pytest.raises(UnknownTargetError, match="unknown target 'nope'.*llvm"):
        tvm_compat.tvm_target("nope")
    with pytest.raises(UnknownTargetError, match="unknown target 'vax'"):
        tvm_compat.tvm_target({"kind": "vax"})
    assert tvm_compat.tvm_target("cpu").kind.name == "llvm"
    assert tvm_compat.tvm_target({"kind": "cuda", "arch": "sm_90"}).attrs["arch"] == "sm_90"


def test_missing_tvm_says_how_to_install(monkeypatch):
    tvm_compat.require_tvm.cache_clear()
    monkeypatch.setitem(sys.modules, "tvm", None)
    try:
        with pytest.raises(LoweringError, match=r"pip install 'optic\[tvm\]'"):
            optic.lower(optic.capture(MLP(), (torch.randn(2, 16),)), "cpu")
    finally:
        tvm_compat.require_tvm.cache_clear()


def test_segmented_program_is_refused(mlp):
    model, x, _ = mlp
    program = optic.capture(model, (x,))
    program.runner = model
    with pytest.raises(LoweringError, match="runs in segments"):
        optic.lower(program, "cpu")


# -- partitioning (no TVM) ----------------------------------------------------------------------------------------
def _chain_graph() -> fx.GraphModule:
    class M(nn.Module):
        def forward(self, x, w):
            a = torch.relu(x)
            b = torch.sigmoid(a)  # declined below
            c = torch.tanh(a) + b  # reads a (before b) and b (after it)
            d = w.t() * 2  # constants only: lands with its reader
            return c @ d

    return fx.symbolic_trace(M())


def test_groups_are_convex_and_constant_ops_join_their_reader():
    gm = _chain_graph()
    names = {n.name: n for n in gm.graph.nodes}
    groups = convex_groups(gm.graph, lambda n: n.name != "sigmoid")
    assert [[n.name for n in g] for g in groups] == [["relu"], ["tanh", "add", "t", "mul", "matmul"]]
    sub = extract(gm, groups[1])
    assert {n.name for n in sub.inputs} == {"w", "relu", "sigmoid"} and [n.name for n in sub.outputs] == ["matmul"]
    x, w = torch.randn(3, 3), torch.randn(3, 3)
    a = torch.relu(x)
    assert torch.allclose(sub.gm(*(dict(w=w, relu=a, sigmoid=torch.sigmoid(a))[n.name] for n in sub.inputs))[0],
                          (torch.tanh(a) + torch.sigmoid(a)) @ (w.t() * 2))
    cut = convex_groups(gm.graph, lambda n: n.name != "sigmoid", {names["matmul"]: 1})
    assert [[n.name for n in g] for g in cut] == [["relu"], ["tanh", "add"], ["t", "mul"], ["matmul"]]
