"""attention_to_sdpa on attention written by hand: the spellings users write (scale on Q, on Kᵀ or on
the scores, as a multiply or a divide, ``math.sqrt``, ``** -0.5``, computed from the input's shape;
masks additive or boolean, added before or after scaling), each exact and fused into exactly one
``scaled_dot_product_attention``; and the cases that must stay as they are."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from helpers import op_kinds, run_exact

from optic import ir
from optic.ir.opview import kind_of

CAPTURES = ["fx", "export"]


def fused_once(opt) -> None:
    """One SDPA, no softmax left, the rule fired once and declined nothing."""
    kinds = op_kinds(opt.program.gm)
    assert kinds.count("sdpa") == 1 and "softmax" not in kinds, kinds
    assert opt.report.matched("attention_to_sdpa") == 1
    assert opt.report.declines("attention_to_sdpa") == []


class BertSelfAttention(nn.Module):
    """BERT's self-attention as people write it: head size and scale from the input's shape, an
    additive mask made from the integer attention mask."""

    def __init__(self, d=16, heads=4, reuse=None):
        super().__init__()
        self.heads, self.reuse = heads, reuse
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        b, n, d = x.shape
        dh = d // self.heads
        q = self.q(x).view(b, n, self.heads, dh).transpose(1, 2)
        k = self.k(x).view(b, n, self.heads, dh).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, dh).transpose(1, 2)
        extended = (1.0 - mask[:, None, None, :].float()) * -1e4
        seen = {"qk": q @ k.transpose(-1, -2)}
        seen["scaled"] = seen["qk"] / (x.shape[-1] // self.heads) ** 0.5
        seen["masked"] = seen["scaled"] + extended
        seen["probs"] = seen["masked"].softmax(-1)
        out = (seen["probs"] @ v).transpose(1, 2).reshape(b, n, d)
        return (out, seen[self.reuse]) if self.reuse else out


def bert_inputs(b=2, n=6, d=16):
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, n - 2:] = 0
    return torch.randn(b, n, d), mask


@pytest.mark.parametrize("capture", CAPTURES)
def test_bert_attention_with_shape_derived_scale_and_integer_mask_fuses(capture):
    opt = run_exact(BertSelfAttention().eval(), bert_inputs(), capture)
    fused_once(opt)


@pytest.mark.parametrize("b, n", [(3, 9), (1, 4)])
def test_bert_attention_captured_with_fx_stays_right_for_other_batch_and_length(b, n):
    model = BertSelfAttention().eval()
    opt = run_exact(model, bert_inputs(), "fx")
    fused_once(opt)
    x, mask = bert_inputs(b, n)
    with torch.no_grad():
        torch.testing.assert_close(opt(x, mask), model(x, mask), rtol=1e-4, atol=1e-5)


def scaled(t, dh, spelling, power=1.0):
    """``t`` times ``dh ** -power/2`` (1/√dh for power 1), spelled as users spell it."""
    if spelling == "mul_pow":
        return t * dh ** (-0.5 * power)
    if spelling == "div_pow":
        return t / dh ** (0.5 * power)
    root = math.sqrt(dh) if power == 1 else math.sqrt(math.sqrt(dh))
    return t / root if spelling == "div_sqrt" else t * (1.0 / root)


class Handwritten(nn.Module):
    """Self-attention with the scale on the scores, on Q, on both Q and Kᵀ, or on the Q projection;
    the head size a number, from the input's shape, or from Q's; a mask of one of the usual kinds."""

    def __init__(self, scale_at, spelling, head_dim, mask, d=16, heads=2):
        super().__init__()
        self.scale_at, self.spelling, self.head_dim, self.mask, self.heads = scale_at, spelling, head_dim, mask, heads
        self.dh = d // heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        b, n, d = x.shape
        dh = {"attr": self.dh, "shape": x.shape[-1] // self.heads}.get(self.head_dim)

        def heads(t):
            return t.view(b, n, self.heads, -1).transpose(1, 2)

        q = self.q(x)
        if self.scale_at == "q_proj":
            q = scaled(q, dh, self.spelling)
        q, k, v = heads(q), heads(self.k(x)), heads(self.v(x))
        dh = q.size(-1) if dh is None else dh
        if self.scale_at == "q":
            q = scaled(q, dh, self.spelling)
        elif self.scale_at == "qk":
            q, k = scaled(q, dh, self.spelling, 0.5), scaled(k, dh, self.spelling, 0.5)
        s = q @ k.transpose(-2, -1)
        if self.mask == "float_before":
            s = s + mask
        elif self.mask == "bool_fill_before":
            s = s.masked_fill(~mask, float("-inf"))
        if self.scale_at == "scores":
            s = scaled(s, dh, self.spelling)
        if self.mask == "float":
            s = mask + s
        elif self.mask == "int":
            s = s + (1.0 - mask[:, None, None, :].float()) * -1e4
        elif self.mask == "bool_fill":
            s = s.masked_fill(~mask, float("-inf"))
        elif self.mask == "bool_where":
            s = torch.where(mask, s, torch.finfo(torch.float32).min)
        elif self.mask == "bool_where_drop":
            s = torch.where(~mask, float("-inf"), s)
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def mask_input(kind, b=2, n=5):
    if kind == "int":
        m = torch.ones(b, n, dtype=torch.long)
        m[0, n - 2:] = 0
        return m
    keep = torch.rand(b, 1, n, n) > 0.4
    keep |= torch.eye(n, dtype=torch.bool)  # no row masked out entirely
    if kind.startswith("float"):
        return torch.where(keep, 0.0, -1e4) + torch.randn(b, 1, n, n)
    return keep


VARIANTS = [  # scale_at, spelling, head_dim, mask
    ("scores", "mul_pow", "shape", None),
    ("scores", "div_sqrt", "q", "float"),
    ("scores", "mul_inv_sqrt", "attr", "float_before"),
    ("scores", "div_sqrt", "shape", "float_before"),
    ("scores", "mul_pow", "attr", "bool_fill_before"),
    ("scores", "div_pow", "shape", "bool_where"),
    ("scores", "div_sqrt", "shape", "bool_fill_before"),
    ("q", "mul_pow", "shape", "bool_fill"),
    ("q", "div_sqrt", "attr", "int"),
    ("q", "div_pow", "attr", "bool_where_drop"),
    ("qk", "mul_pow", "shape", "float"),
    ("qk", "div_sqrt", "q", None),
    ("q_proj", "mul_inv_sqrt", "attr", "int"),
    ("q_proj", "div_pow", "shape", None),
]


def tensor_ops(gm, kind):
    """Ops of ``kind`` on tensors (not the Python arithmetic of a shape-dependent scale)."""
    return [n for n in gm.graph.nodes if kind_of(n, gm) == kind and ir.tensor_meta(n) is not None]


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("scale_at, spelling, head_dim, mask", VARIANTS, ids=["-".join(map(str, v)) for v in VARIANTS])
def test_handwritten_attention_fuses_exactly(capture, scale_at, spelling, head_dim, mask):
    model = Handwritten(scale_at, spelling, head_dim, mask).eval()
    opt = run_exact(model, (torch.randn(2, 5, 16), mask_input(mask or "bool")), capture)
    fused_once(opt)
    gm = opt.program.gm
    # every scale went into SDPA's: the only tensor multiplies left make (or rescale) the mask
    assert tensor_ops(gm, "div") == []
    assert len(tensor_ops(gm, "mul")) == (mask in ("int", "float_before"))


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("reuse", ["qk", "scaled", "masked", "probs"])
def test_attention_whose_intermediate_is_read_elsewhere_stays(capture, reuse):
    opt = run_exact(BertSelfAttention(reuse=reuse).eval(), bert_inputs(), capture)
    assert opt.report.matched("attention_to_sdpa") == 0
    assert "sdpa" not in op_kinds(opt.program.gm)
    assert "used elsewhere" in opt.report.declines("attention_to_sdpa")[0]["reason"]


def test_attention_captured_with_fx_keeps_its_scale_live_for_other_head_sizes():
    """The scale is 1/√(Q's last dim): a constant folded from the example would be wrong for another one."""

    class Attention(nn.Module):
        def forward(self, q, k, v, mask):
            s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
            return (s + mask).softmax(-1) @ v

    def inputs(b, h, n, dh):
        return torch.randn(b, h, n, dh), torch.randn(b, h, n, dh), torch.randn(b, h, n, dh), torch.randn(b, 1, 1, n)

    model = Attention()
    opt = run_exact(model, inputs(2, 2, 5, 4), "fx")
    fused_once(opt)
    other = inputs(3, 2, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(opt(*other), model(*other), rtol=1e-4, atol=1e-5)


class Unusual(nn.Module):
    """Attention-like code SDPA does not compute: a bool mask added (adds 0 or 1), a fill that masks
    nothing, a finite fill under a shape-dependent scale, a learned per-head temperature."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.temperature = nn.Parameter(torch.rand(2, 1, 1) + 0.5)

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1)
        if self.kind == "bool_added":
            s = s * q.shape[-1] ** -0.5 + keep
        elif self.kind == "fill_zero":
            s = (s / 2.0).masked_fill(~keep, 0.0)
        elif self.kind == "finite_fill_before_shape_scale":
            s = s.masked_fill(~keep, -1e9) / math.sqrt(q.shape[-1])
        elif self.kind == "temperature":
            s = s * self.temperature
        return s.softmax(-1) @ v


def qkv_keep(b=2, h=2, n=5, dh=4):
    keep = (torch.rand(b, 1, n, n) > 0.4) | torch.eye(n, dtype=torch.bool)
    return torch.randn(b, h, n, dh), torch.randn(b, h, n, dh), torch.randn(b, h, n, dh), keep


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("kind, reason", [
    ("bool_added", "additive mask"),
    ("fill_zero", "masked scores become 0"),
    ("temperature", "found a mul"),
])
def test_attention_that_sdpa_does_not_compute_is_declined(capture, kind, reason):
    opt = run_exact(Unusual(kind), qkv_keep(), capture)
    assert opt.report.matched("attention_to_sdpa") == 0
    assert "sdpa" not in op_kinds(opt.program.gm)
    assert reason in opt.report.declines("attention_to_sdpa")[0]["reason"]
    assert not any(p.rolled_back for p in opt.report.passes)


def test_finite_fill_before_a_shape_dependent_scale_is_declined_under_fx_only():
    fx_opt = run_exact(Unusual("finite_fill_before_shape_scale"), qkv_keep(), "fx")
    assert fx_opt.report.matched("attention_to_sdpa") == 0
    assert "not -inf, before a scale that depends on the input shape" in \
        fx_opt.report.declines("attention_to_sdpa")[0]["reason"]
    fused_once(run_exact(Unusual("finite_fill_before_shape_scale"), qkv_keep(), "export"))  # static: -1e9/2 is low
