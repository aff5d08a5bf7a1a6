"""fuse: horizontal linears (QKV, also unequal widths), attention to SDPA, linear chains,
activation adjacency; and the negative cases (an intermediate reused elsewhere)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import op_kinds, run_exact

from optic.ir.capture import capture as capture_program

CAPTURES = ["fx", "export"]


class Attn(nn.Module):
    def __init__(self, d=16, heads=4, kv_heads=4, scale_as="mul", mask=None, reuse=None):
        super().__init__()
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, kv_heads * self.dh), nn.Linear(d, kv_heads * self.dh)
        self.scale_as, self.mask, self.reuse = scale_as, mask, reuse
        self.register_buffer("bias", torch.randn(1, 1, 6, 6))
        self.register_buffer("causal", torch.tril(torch.ones(6, 6, dtype=torch.bool)))

    def forward(self, x):
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.dh).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
        v = self.v(x).view(b, n, self.kv, self.dh).transpose(1, 2).repeat_interleave(self.h // self.kv, 1)
        s = q @ k.transpose(-2, -1)
        s = s * (1 / math.sqrt(self.dh)) if self.scale_as == "mul" else s / math.sqrt(self.dh)
        if self.mask == "add":
            s = s + self.bias
        elif self.mask == "causal":
            s = s.masked_fill(~self.causal, float("-inf"))
        p = s.softmax(-1)
        out = (p @ v).transpose(1, 2).reshape(b, n, d)
        if self.reuse == "probs":
            return out, p
        if self.reuse == "scores":
            return out, s
        return out


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("scale_as", ["mul", "div"])
@pytest.mark.parametrize("mask", [None, "add", "causal"])
def test_attention_becomes_sdpa(capture, scale_as, mask):
    opt = run_exact(Attn(scale_as=scale_as, mask=mask).eval(), (torch.randn(2, 6, 16),), capture)
    kinds = op_kinds(opt.program.gm)
    assert opt.report.matched("attention_to_sdpa") == 1
    assert "sdpa" in kinds and "softmax" not in kinds


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("reuse", ["probs", "scores"])
def test_attention_with_reused_intermediate_is_not_fused(capture, reuse):
    opt = run_exact(Attn(reuse=reuse).eval(), (torch.randn(2, 6, 16),), capture)
    assert opt.report.matched("attention_to_sdpa") == 0
    assert "softmax" in op_kinds(opt.program.gm)
    assert "used elsewhere" in opt.report.declines("attention_to_sdpa")[0]["reason"]


@pytest.mark.parametrize("capture", CAPTURES)
def test_grouped_query_qkv_of_unequal_widths_fuse(capture):
    opt = run_exact(Attn(d=16, heads=4, kv_heads=2).eval(), (torch.randn(2, 6, 16),), capture)
    assert opt.report.matched("horizontal_linear") == 1
    assert op_kinds(opt.program.gm).count("linear") == 1
    fused = [n for n in opt.program.gm.graph.nodes if "split_with_sizes" in str(n.target)]
    assert fused and fused[0].args[1] == [16, 8, 8]


@pytest.mark.parametrize("capture", CAPTURES)
def test_linear_chain_merges_only_when_cheaper(capture):
    narrow = nn.Sequential(nn.Linear(32, 4), nn.Dropout(0.1), nn.Linear(4, 32)).eval()
    opt = run_exact(narrow, (torch.randn(3, 32),), capture)
    assert opt.report.matched("merge_linear_chain") == 0  # 32×32 costs more than 4×32 + 32×4
    assert "costs more" in opt.report.declines("merge_linear_chain")[0]["reason"]
    wide = nn.Sequential(nn.Linear(8, 64), nn.Linear(64, 4)).eval()
    opt = run_exact(wide, (torch.randn(3, 8),), capture)
    assert opt.report.matched("merge_linear_chain") == 1
    assert op_kinds(opt.program.gm) == ["linear"]


@pytest.mark.parametrize("capture", CAPTURES)
def test_linear_chain_with_reused_intermediate_is_not_merged(capture):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 64), nn.Linear(64, 4)

        def forward(self, x):
            h = self.a(x)
            return self.b(h), h.sum()

    opt = run_exact(M(), (torch.randn(2, 8),), capture)
    assert opt.report.matched("merge_linear_chain") == 0


def test_activation_moves_next_to_its_conv():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.conv(x)
            z = x * 2
            return F.relu(y) + z

    opt = run_exact(M(), (torch.randn(1, 3, 4, 4),), "fx", passes=["fuse"])
    nodes = [n for n in opt.program.gm.graph.nodes if n.op != "get_attr"]
    conv = next(i for i, n in enumerate(nodes) if n.target == "conv")
    assert "relu" in str(nodes[conv + 1].target)
    assert opt.report.matched("act_adjacent") == 1


class NewGelu(nn.Module):
    """GPT-2's gelu_new, as transformers writes it."""

    def __init__(self, reuse=False):
        super().__init__()
        self.fc, self.reuse = nn.Linear(8, 8), reuse

    def forward(self, x):
        x = self.fc(x)
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))
        y = 0.5 * x * (1.0 + torch.tanh(inner))
        return (y, inner) if self.reuse else y


@pytest.mark.parametrize("capture", CAPTURES)
def test_written_out_gelu_becomes_one_op(capture):
    opt = run_exact(NewGelu(), (torch.randn(4, 8),), capture)
    assert opt.report.matched("gelu_tanh") == 1
    assert op_kinds(opt.program.gm) == ["linear", "act:gelu"]


@pytest.mark.parametrize("capture", CAPTURES)
def test_written_out_gelu_with_reused_intermediate_stays(capture):
    opt = run_exact(NewGelu(reuse=True), (torch.randn(4, 8),), capture)
    assert opt.report.matched("gelu_tanh") == 0
    assert "used elsewhere" in opt.report.declines("gelu_tanh")[0]["reason"]


# -- before / expected ------------------------------------------------------------------------------
def _kinds_by_name(gm) -> dict[str, str]:
    """Each op node's name with its kind as ``op_kinds`` writes it (op_kinds lists exactly the call nodes)."""
    calls = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return dict(zip(calls, op_kinds(gm), strict=True))


class PlainAttn(nn.Module):
    """Single-head attention without reshapes: Q, K, V projections, scaled scores, softmax, times V."""

    def __init__(self, d=8, reuse=False):
        super().__init__()
        self.q, self.k, self.v, self.reuse = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), reuse

    def forward(self, x):
        p = (self.q(x) @ self.k(x).transpose(-2, -1) * 0.5).softmax(-1)
        out = p @ self.v(x)
        return (out, p) if self.reuse else out


class Chain(nn.Module):
    def __init__(self, reuse=False):
        super().__init__()
        self.a, self.b, self.reuse = nn.Linear(8, 64), nn.Linear(64, 4), reuse

    def forward(self, x):
        h = self.a(x)
        return (self.b(h), h.sum()) if self.reuse else self.b(h)


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("make,x,before,expected,matched", [
    (PlainAttn, (2, 6, 8), ["linear", "linear", "transpose", "matmul", "mul", "softmax", "linear", "matmul"],
     ["linear", "split", "getitem", "getitem", "getitem", "sdpa"], {"attention_to_sdpa": 1, "horizontal_linear": 1}),
    (NewGelu, (4, 8), ["linear", "pow", "mul", "add", "mul", "mul", "act:tanh", "add", "mul"], ["linear", "act:gelu"],
     {"gelu_tanh": 1}),
    (Chain, (3, 8), ["linear", "linear"], ["linear"], {"merge_linear_chain": 1}),
])
def test_before_expected(capture, make, x, before, expected, matched):
    m, inputs = make().eval(), (torch.randn(*x),)
    assert op_kinds(capture_program(m, inputs, method=capture).gm) == before
    opt = run_exact(m, inputs, capture, passes=["fuse"])
    assert op_kinds(opt.program.gm) == expected
    assert opt.report.pass_record("fuse").matched == matched


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("make,rule,kind,why", [
    (lambda: PlainAttn(reuse=True), "attention_to_sdpa", "matmul", "also used elsewhere"),
    (lambda: Chain(reuse=True), "merge_linear_chain", "linear", "has other users"),
])
def test_declines_name_the_node_the_rule_looked_at(capture, make, rule, kind, why):
    m = make().eval()
    inputs = (torch.randn(2, 6, 8),)
    kinds = _kinds_by_name(capture_program(m, inputs, method=capture).gm)
    opt = run_exact(m, inputs, capture, passes=["fuse"])
    assert opt.report.matched(rule) == 0
    declined = opt.report.declines(rule)
    assert declined and all(kinds.get(d["node"]) == kind and why in d["reason"] for d in declined), declined
