"""Hypothesis strategies: random traceable models built from blocks, with random inputs.

Blocks cover what the passes rewrite and the cases that bit other tools: conv/BN/activation with
random kernel, stride, groups (depthwise too), transposed convs with groups (the axis folders get
wrong), BN with batch statistics (must not fold), residual adds, a producer shared by BN and
another consumer, standalone BN, in-place activations, linear/BN1d, linear chains, layer norm
feeding several linears of unequal widths, hand-written RMSNorm, attention with a scale as mul or
div, additive or causal masks, grouped-query widths, and attention whose probabilities are also
read elsewhere (must not fuse). ``contract_models`` wraps any of them in the call contracts users write:
an optional argument, container outputs (tuple, named tuple, dict, dataclass, nested), in-place buffer
updates.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

ACTS = [None, "relu", "relu_inplace", "relu6", "gelu", "silu", "hardswish", "sigmoid", "leaky_relu", "tanh"]


def make_act(name):
    return {None: nn.Identity(), "relu": nn.ReLU(), "relu_inplace": nn.ReLU(inplace=True), "relu6": nn.ReLU6(),
            "gelu": nn.GELU(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(), "sigmoid": nn.Sigmoid(),
            "leaky_relu": nn.LeakyReLU(0.1), "tanh": nn.Tanh()}[name]


def randomize_bn(bn: nn.Module, g: torch.Generator) -> nn.Module:
    with torch.no_grad():
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.5)
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) * 1.5 + 0.5)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(bn.weight.shape, generator=g) * 0.5 + 1)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.5)
    return bn


# -- CNN blocks -------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    def __init__(self, c_in, c_out, k, stride, groups, transposed, bias, bn, bn_batch_stats, act, g):
        super().__init__()
        if transposed:
            self.conv = nn.ConvTranspose2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias,
                                           output_padding=stride - 1 if k % 2 else 0)
        else:
            self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
        self.bn = randomize_bn(nn.BatchNorm2d(c_out, track_running_stats=not bn_batch_stats), g) if bn else nn.Identity()
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class SharedProducer(nn.Module):
    """conv output read by a BN and by the add: the BN must not fold into the conv."""

    def __init__(self, c, g):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = randomize_bn(nn.BatchNorm2d(c), g)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Standalone(nn.Module):
    def __init__(self, c, g):
        super().__init__()
        self.bn = randomize_bn(nn.BatchNorm2d(c), g)

    def forward(self, x):
        return self.bn(torch.relu(x))


# -- feature (vector) blocks --------------------------------------------------------------------------
class LinearBlock(nn.Module):
    def __init__(self, f_in, f_out, bias, bn, act, g):
        super().__init__()
        self.fc = nn.Linear(f_in, f_out, bias=bias)
        self.bn = randomize_bn(nn.BatchNorm1d(f_out), g) if bn else nn.Identity()
        self.act = make_act(act)

    def forward(self, x):
        return self.act(self.bn(self.fc(x)))


class LinearChain(nn.Module):
    def __init__(self, f_in, mid, f_out):
        super().__init__()
        self.a, self.b = nn.Linear(f_in, mid), nn.Linear(mid, f_out)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.drop(self.a(x)))


class NormLinears(nn.Module):
    """A norm read by several linears of unequal widths, summed back to one width."""

    def __init__(self, f, widths, kind, g):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(f)
        with torch.no_grad():
            self.norm.weight.copy_(torch.randn(f, generator=g) * 0.5 + 1)
            self.norm.bias.copy_(torch.randn(f, generator=g) * 0.5)
        self.rms_weight = nn.Parameter(torch.randn(f, generator=g) * 0.5 + 1)
        self.heads = nn.ModuleList(nn.Linear(f, w) for w in widths)
        self.back = nn.ModuleList(nn.Linear(w, f) for w in widths)

    def forward(self, x):
        if self.kind == "layer_norm":
            h = self.norm(x)
        else:  # hand-written RMSNorm, as LLaMA writes it
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            h = self.rms_weight * h
        out = x
        for head, back in zip(self.heads, self.back, strict=True):
            out = out + back(head(h))
        return out


# -- token blocks ------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, d, heads, kv_heads, scale_as, mask, reuse, seq, g):
        super().__init__()
        self.h, self.kv, self.dh = heads, kv_heads, d // heads
        self.q = nn.Linear(d, heads * self.dh)
        self.k = nn.Linear(d, kv_heads * self.dh)
        self.v = nn.Linear(d, kv_heads * self.dh)
        self.o = nn.Linear(heads * self.dh, d)
        self.scale_as, self.mask, self.reuse = scale_as, mask, reuse
        self.register_buffer("causal", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))
        self.register_buffer("additive", torch.randn(1, 1, seq, seq, generator=g))

    def forward(self, x):
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, n, self.kv, self.dh).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.dh).transpose(1, 2)
        if self.kv != self.h:  # grouped-query attention: repeat K/V heads
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        if self.scale_as == "mul":
            s = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.dh))
        elif self.scale_as == "div":
            s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.dh)
        else:
            s = (q * self.dh ** -0.5) @ k.transpose(-2, -1)
        if self.mask == "additive":
            s = s + self.additive
        elif self.mask == "causal":
            s = s.masked_fill(~self.causal, float("-inf"))
        p = F.softmax(s, dim=-1)
        out = (p @ v).transpose(1, 2).reshape(b, n, d)
        out = x + self.o(out)
        if self.reuse:  # the probabilities are read elsewhere: fusing would lose them
            out = out + p.mean()
        return out


class Mlp(nn.Module):
    def __init__(self, d, hidden, act):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.act = make_act(act)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class Net(nn.Module):
    def __init__(self, body, head=None, pool=False):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.pool = pool
        self.head = nn.Sequential(*(head or []))

    def forward(self, x):
        x = self.body(x)
        if self.pool:
            x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


@st.composite
def cnn_models(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    c = c0 = draw(st.sampled_from([3, 4, 6]))
    size = draw(st.sampled_from([8, 12]))
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "tconv", "residual", "shared", "standalone"]))
        if kind in ("conv", "tconv"):
            c_out = draw(st.sampled_from([4, 6, 8]))
            groups = draw(st.sampled_from([g_ for g_ in (1, 2, c) if c % g_ == 0 and c_out % g_ == 0]))
            if kind == "conv" and draw(st.booleans()) and groups == c:
                c_out = c  # depthwise
            blocks.append(ConvBlock(c, c_out, draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 1, 2])) if kind == "conv" else 1,
                                    groups, kind == "tconv", draw(st.booleans()), draw(st.sampled_from([True, True, False])),
                                    draw(st.booleans()) and draw(st.booleans()), draw(st.sampled_from(ACTS)), g))
            c = c_out
        elif kind == "residual":
            blocks.append(Residual(ConvBlock(c, c, 3, 1, 1, False, True, True, False, draw(st.sampled_from(ACTS[:4])), g)))
        elif kind == "shared":
            blocks.append(SharedProducer(c, g))
        else:
            blocks.append(Standalone(c, g))
    head = [LinearBlock(c, 10, True, draw(st.booleans()), draw(st.sampled_from(ACTS)), g)]
    model = Net(blocks, head, pool=True).eval()
    return model, (torch.randn(2, c0, size, size, generator=g),)


@st.composite
def mlp_models(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    f = draw(st.sampled_from([8, 12, 16]))
    f0 = f
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["linear", "chain", "norm"]))
        if kind == "linear":
            out = draw(st.sampled_from([8, 12, 16]))
            blocks.append(LinearBlock(f, out, draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from(ACTS)), g))
            f = out
        elif kind == "chain":
            out = draw(st.sampled_from([4, 8, 16]))
            blocks.append(LinearChain(f, draw(st.sampled_from([2, 4, 32])), out))
            f = out
        else:
            widths = draw(st.lists(st.sampled_from([4, 8, 12]), min_size=1, max_size=3))
            blocks.append(NormLinears(f, widths, draw(st.sampled_from(["layer_norm", "rms"])), g))
    model = Net(blocks).eval()
    return model, (torch.randn(draw(st.sampled_from([2, 4])), f0, generator=g),)


@st.composite
def token_models(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    d = draw(st.sampled_from([16, 32]))
    seq = draw(st.sampled_from([4, 8]))
    blocks = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["attn", "attn", "mlp", "norm"]))
        if kind == "attn":
            heads = draw(st.sampled_from([2, 4]))
            kv = draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0]))
            blocks.append(Attention(d, heads, kv, draw(st.sampled_from(["mul", "div", "q"])),
                                    draw(st.sampled_from([None, "additive", "causal"])), draw(st.booleans()) and draw(st.booleans()), seq, g))
        elif kind == "mlp":
            blocks.append(Mlp(d, draw(st.sampled_from([16, 64])), draw(st.sampled_from(["gelu", "relu", "silu"]))))
        else:
            blocks.append(NormLinears(d, draw(st.lists(st.sampled_from([8, 16]), min_size=1, max_size=3)),
                                      draw(st.sampled_from(["layer_norm", "rms"])), g))
    model = Net(blocks).eval()
    return model, (torch.randn(2, seq, d, generator=g),)


def any_model():
    return st.one_of(cnn_models(), mlp_models(), token_models())


# -- call contracts ------------------------------------------------------------------------------------
Pair = collections.namedtuple("Pair", "out extra")


@dataclasses.dataclass
class Result:
    out: torch.Tensor
    extra: Any
    tag: str = "result"


OUTPUTS = ["tensor", "tuple", "namedtuple", "dict", "dataclass", "nested"]


class ContractNet(nn.Module):
    """``inner`` with an optional mask argument, a container output, and a buffer updated in forward:
    ``"tally"`` (the output does not read it) or ``"counter"`` (it does: capture must refuse, naming it)."""

    def __init__(self, inner, output, buffer):
        super().__init__()
        self.inner, self.output, self.buffer = inner, output, buffer
        self.register_buffer("state", torch.zeros(()))

    def forward(self, x, mask=None):
        y = self.inner(x)
        if mask is not None:
            y = y * mask
        if self.buffer == "tally":
            self.state.add_(1.0)
        elif self.buffer == "counter":
            self.state.add_(1.0)
            y = y * self.state
        extra = y.sum(-1)
        return {"tensor": lambda: y, "tuple": lambda: (y, extra), "namedtuple": lambda: Pair(y, extra),
                "dict": lambda: {"out": y, "extra": extra}, "dataclass": lambda: Result(y, extra),
                "nested": lambda: Pair(y, {"a": [extra, Result(y.relu(), (extra * 2,))]})}[self.output]()


@st.composite
def contract_models(draw):
    """(model, x, mask, how the example passes the mask: None / "positional" / "keyword", buffer kind)."""
    inner, (x,) = draw(st.one_of(cnn_models(), mlp_models(), token_models()))
    buffer = draw(st.sampled_from([None, None, "tally", "counter"]))
    model = ContractNet(inner, draw(st.sampled_from(OUTPUTS)), buffer).eval()
    with torch.no_grad():
        shape = inner(x).shape
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    mask = (torch.rand(shape, generator=g) > 0.3).float()
    return model, x, mask, draw(st.sampled_from([None, "positional", "keyword"])), buffer
