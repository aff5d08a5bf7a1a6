"""Structured pruning: the channel-coupling analysis on hand-built models (exact membership, and the
reason when a group cannot be pruned), its transfer table, small models before and after pruning
(op kinds and channel counts), the surgery (exact when the removed channels are zero, on fx and
export captures), the proposed actions, and a property test over generated models."""

from __future__ import annotations

import operator
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import cnn_models, mlp_models, token_models

import optic
from optic import ir
from optic.budget.allocator import build
from optic.budget.calibration import Budget, split
from optic.ir.capture import capture
from optic.ir.opview import view
from optic.passes.prune import keep_count, preferred_multiple, prune_group, removed_positions, select_channels
from optic.passes.prune.channels import analyse
from optic.passes.prune.spaces import Chan
from optic.passes.prune.transfer import PRODUCERS, TRANSFER, reshape_chan
from optic.pipeline.registry import get
from optic.pipeline.runner import PassContext

METHODS = ["fx", "export"]
CPU = optic.targets.get("cpu")


def ctx_for(**options) -> PassContext:
    return PassContext(target=CPU, measure=options.pop("measure", False), calibration=options.pop("calibration", None),
                       options=options)


def summary(prog) -> list[dict]:
    """Every group as layer names: producers, through members (slices), consumers, and the reason."""
    def layers(g, role):
        return sorted({ir.layer_name(e.node) for e in g.edits if e.kind == "tensor" and e.role == role})

    return [{"producers": [ir.layer_name(p) for p in g.producers], "through": layers(g, "through"),
             "consumers": layers(g, "consumer"), "n": g.n, "unit": g.unit, "reason": g.reason}
            for g in analyse(prog.gm).groups]


def group_of(prog, producer: str) -> dict:
    return next(g for g in summary(prog) if producer in g["producers"])


# -- models ------------------------------------------------------------------------------------------------
class ConvBnConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


class ResidualNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        return self.fc(self.head(x).mean((2, 3)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1), nn.Conv2d(10, 5, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), self.b(x)], 1)).flatten(1)


class Depthwise(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.pw, self.dw, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=groups), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(F.relu6(self.dw(self.pw(x))))


class Ffn(nn.Module):
    def __init__(self, d=8, hidden=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(F.relu(self.conv(x)), 2), 1))


class LayerNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.ln(self.fc1(x))))


class Rolled(nn.Module):
    """torch.roll along the channels: an op the analysis does not understand there."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        return self.conv3(torch.roll(self.conv2(y), 1, dims=1))


class Attention(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        s = (q @ k.transpose(-2, -1)) * (d // self.h) ** -0.5
        y = (F.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, d)
        return x + self.o(y)


class SdpaBlock(nn.Module):
    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 32), nn.Linear(32, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.h, d // self.h).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(y)
        return x + self.fc2(F.relu(self.fc1(x)))


# -- the analysis ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_conv_bn_relu_conv_is_one_group(method):
    prog = capture(ConvBnConv().eval(), (torch.randn(2, 3, 6, 6),), method=method)
    last = "conv2" if method == "fx" else "conv2d_1"
    assert summary(prog) == [
        {"producers": ["conv1"], "through": ["bn"], "consumers": ["conv2"], "n": 8, "unit": 1, "reason": None},
        {"producers": ["conv2"], "through": [], "consumers": [], "n": 4, "unit": 1,
         "reason": f"its channels reach the graph output ('{last}')"}]


@pytest.mark.parametrize("method", METHODS)
def test_residual_add_couples_its_producers(method):
    prog = capture(ResidualNet().eval(), (torch.randn(2, 3, 6, 6),), method=method)
    groups = summary(prog)
    assert group_of(prog, "stem") == {"producers": ["stem", "conv2"], "through": ["bn0", "bn2"],
                                      "consumers": ["conv1", "head"], "n": 8, "unit": 1, "reason": None}
    assert group_of(prog, "conv1") == {"producers": ["conv1"], "through": ["bn1"], "consumers": ["conv2"],
                                       "n": 8, "unit": 1, "reason": None}
    # the head is reduced over space (mean) and read by fc: its own group
    assert group_of(prog, "head")["consumers"] == ["fc"] and group_of(prog, "head")["reason"] is None
    assert len(groups) == 4 and "output" in group_of(prog, "fc")["reason"]


@pytest.mark.parametrize("method", METHODS)
def test_concat_lays_groups_side_by_side(method):
    prog = capture(Concat().eval(), (torch.randn(2, 3, 5, 5),), method=method)
    assert group_of(prog, "a")["consumers"] == ["c"] and group_of(prog, "b")["consumers"] == ["c"]
    offsets = {ir.layer_name(g.producers[0]): [e.offset for e in g.edits if e.role == "consumer"]
               for g in analyse(prog.gm).groups}
    assert offsets["a"] == [0] and offsets["b"] == [4]


@pytest.mark.parametrize("method", METHODS)
def test_depthwise_conv_couples_in_and_out_and_grouped_conv_declines(method):
    prog = capture(Depthwise(8).eval(), (torch.randn(1, 3, 5, 5),), method=method)
    assert group_of(prog, "pw") == {"producers": ["pw"], "through": ["dw"], "consumers": ["out"], "n": 8, "unit": 1,
                                    "reason": None}
    grouped = capture(Depthwise(2).eval(), (torch.randn(1, 3, 5, 5),), method=method)
    assert "grouped convolution" in group_of(grouped, "pw")["reason"]
    assert [g["producers"] for g in summary(grouped)] == [["pw"], ["out"]]  # a grouped conv produces no space


@pytest.mark.parametrize("method", METHODS)
def test_ffn_neurons_flatten_and_layer_norm(method):
    ffn = capture(Ffn().eval(), (torch.randn(2, 3, 8),), method=method)
    assert group_of(ffn, "fc1") == {"producers": ["fc1"], "through": [], "consumers": ["fc2"], "n": 32, "unit": 1,
                                    "reason": None}
    flat = capture(FlattenLinear().eval(), (torch.randn(2, 3, 8, 8),), method=method)
    g = next(g for g in analyse(flat.gm).groups if ir.layer_name(g.producers[0]) == "conv")
    assert g.reason is None and [(ir.layer_name(e.node), e.scale) for e in g.edits if e.role == "consumer"] == [("fc", 16)]
    ln = capture(LayerNormed().eval(), (torch.randn(4, 6),), method=method)
    assert group_of(ln, "fc1") == {"producers": ["fc1"], "through": ["ln"], "consumers": ["fc2"], "n": 16, "unit": 1,
                                   "reason": None}


@pytest.mark.parametrize("method", METHODS)
def test_an_op_not_understood_on_the_channels_declines_with_a_reason(method):
    prog = capture(Rolled().eval(), (torch.randn(1, 3, 4, 4),), method=method)
    assert group_of(prog, "conv1")["reason"] is None
    reason = group_of(prog, "conv2")["reason"]
    assert "roll" in reason and "does not understand" in reason
    ctx = ctx_for(prune_fraction=0.5)
    get("prune").run(prog, ctx)
    assert any("roll" in why for _, _, why in ctx.stats.declined)


class Reshaped(nn.Module):
    """Ops around the channels that keep them: padding, slicing, (un)squeezing, indexing, a gate."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.gate, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        y = F.pad(F.relu(self.conv1(x)), (1, 1, 1, 1))[:, :, 1:, :]
        y = self.conv2(y).mean(-1)  # [N, C, H-2]
        g = torch.sigmoid(self.gate(y.mean(-1))).unsqueeze(-1)  # [N, C, 1]
        z = (y * g).unsqueeze(1)[..., :1].squeeze(-1).squeeze(1)  # [N, C]
        return self.out(z)


@pytest.mark.parametrize("method", METHODS)
def test_padding_slicing_squeezing_and_a_gate_keep_the_channels(method):
    model, x = Reshaped().eval(), torch.randn(2, 3, 5, 5)
    prog = capture(model, (x,), method=method)
    assert group_of(prog, "conv1") == {"producers": ["conv1"], "through": [], "consumers": ["conv2"], "n": 8, "unit": 1,
                                       "reason": None}
    assert group_of(prog, "conv2") == {"producers": ["conv2", "gate"], "through": [], "consumers": ["gate", "out"],
                                       "n": 8, "unit": 1, "reason": None}
    ref = prog.run()
    assert get("prune").run(prog, ctx_for(prune_fraction=0.5, prune_multiple=1))
    assert prog.run().shape == ref.shape


class Tied(nn.Module):
    """One conv applied twice: its weights are tied, so neither its input nor its output can shrink."""

    def __init__(self):
        super().__init__()
        self.conv1, self.shared, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.shared(F.relu(self.shared(F.relu(self.conv1(x)))))))


@pytest.mark.parametrize("method", METHODS)
def test_tied_weights_decline(method):
    prog = capture(Tied().eval(), (torch.randn(1, 3, 4, 4),), method=method)
    assert [g["reason"] for g in summary(prog)][0].endswith("its weight is shared with another op (tied)")
    assert get("prune").run(prog, ctx_for(prune_fraction=0.5)) is False


@pytest.mark.parametrize("method", METHODS)
def test_attention_heads_are_one_group(method):
    prog = capture(Attention().eval(), (torch.randn(2, 5, 16),), method=method)
    g = group_of(prog, "q")
    assert g == {"producers": ["q", "k", "v"], "through": [], "consumers": ["o"], "n": 16, "unit": 4, "reason": None}
    # the residual stream is the graph input: its channels are fixed
    assert group_of(prog, "o")["reason"] == "'add' combines them with 'x', whose channels are not pruned with them"


# -- the transfer table ------------------------------------------------------------------------------------------
# every op kind the analysis handled before it was a table (a k_<kind> method, or conv/linear as producers)
HANDLED_KINDS = {"conv", "linear", "act", "dropout", "identity", "contiguous", "cast", "neg", "exp", "sqrt", "rsqrt",
                 "pool", "resample", "batch_norm", "layer_norm", "rms_norm", "group_norm", "softmax", "mean",
                 "transpose", "permute", "reshape", "flatten", "pad", "slice", "unsqueeze", "squeeze", "getitem",
                 "split", "cat", "add", "sub", "mul", "div", "pow", "where", "masked_fill", "matmul", "sdpa"}
# kinds of one behaviour: one entry
SHARED = [("act", "dropout", "identity", "contiguous", "cast", "neg", "exp", "sqrt", "rsqrt"), ("pool", "resample"),
          ("layer_norm", "rms_norm"), ("reshape", "flatten"), ("add", "sub", "mul", "div", "pow"), ("where", "masked_fill")]


def test_the_transfer_table_covers_every_kind_the_analysis_handled():
    assert set(TRANSFER) == HANDLED_KINDS and PRODUCERS <= set(TRANSFER)
    for kinds in SHARED:
        assert len({id(TRANSFER[k]) for k in kinds}) == 1, kinds
    # and the others have an entry each
    assert len({id(t) for t in TRANSFER.values()}) == len(TRANSFER) - sum(len(kinds) - 1 for kinds in SHARED)


class Negated(nn.Module):
    """logical_not: a kind the op view knows and the table does not."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv2(torch.logical_not(self.conv1(x)).float())


@pytest.mark.parametrize("method", METHODS)
def test_a_kind_without_an_entry_falls_back_to_not_understood(method):
    assert "logical_not" not in TRANSFER
    prog = capture(Negated().eval(), (torch.randn(1, 3, 4, 4),), method=method)
    op = next(view(n, prog.gm) for n in prog.gm.graph.nodes if "logical_not" in n.name)
    assert op.kind == "logical_not"
    assert group_of(prog, "conv1")["reason"] == \
        f"'{op.node.name}' (logical_not) reads them in a way pruning does not understand"


def test_reshape_moves_channels_by_merging_later_axes_or_splitting_heads():
    c = Chan(1, ((0, 8),))
    assert reshape_chan((2, 8, 3, 3), (2, 72), c) == Chan(1, ((0, 72),), Fraction(9))  # 9 features per channel
    assert reshape_chan((2, 8, 3, 3), (2, 8, 9), c) == Chan(1, ((0, 8),))
    heads = Chan(2, ((0, 16),))
    assert reshape_chan((2, 5, 16), (2, 5, 4, 4), heads) == Chan(2, ((0, 4),), Fraction(1, 4))  # a head: 4 channels
    assert reshape_chan((2, 8, 3, 3), (16, 3, 3), c) is None  # merged with the batch axis: not a slice
    # heads of 3 channels would cut the space of 10 (the other 2 channels are fixed)
    assert reshape_chan((2, 5, 12), (2, 5, 4, 3), Chan(2, ((0, 10), (None, 2)))) is None


class SplitApart(nn.Module):
    """One linear split into three pieces read apart: three groups with one first producer."""

    def __init__(self):
        super().__init__()
        self.fc, self.fa, self.fb = nn.Linear(4, 24), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        a, b, c = self.fc(x).split([8, 8, 8], -1)
        return self.fa(F.relu(a)) + self.fb(b), c


@pytest.mark.parametrize("method", METHODS)
def test_pieces_of_one_producer_are_found_and_declined_at_it_in_group_order(method):
    prog = capture(SplitApart().eval(), (torch.randn(2, 4),), method=method)
    groups = analyse(prog.gm).groups
    fc, fa = groups[0].producers[0].name, groups[3].producers[0].name
    assert [g.key for g in groups] == [(f"{fc}[0]",), (f"{fc}[1]",), (f"{fc}[2]",), (fa, groups[3].key[1])]
    assert [(g["consumers"], g["reason"] is None) for g in summary(prog)] == [
        (["fa"], True), (["fb"], True), ([], False), ([], False)]
    names = {n.name for n in prog.gm.graph.nodes}
    ref = prog.run()
    ctx = ctx_for(prune_fraction=0.5, prune_multiple=1)
    assert get("prune").run(prog, ctx)
    assert ctx.stats.matched == {"prune": 2}  # both pieces read by a layer
    assert [(node, "reach the graph output" in why) for _, node, why in ctx.stats.declined] == [(fc, True), (fa, True)]
    assert {node for _, node, _ in ctx.stats.declined} <= names
    assert [ir.shape(n)[-1] for n in prog.gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem] == [4, 4, 8]
    assert [o.shape for o in prog.run()] == [o.shape for o in ref]


# -- the math ----------------------------------------------------------------------------------------------------
def test_levels_round_to_the_target_multiple_and_never_to_zero():
    assert [keep_count(64, f, 16) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4)] == [64, 48, 32, 16]
    assert [keep_count(8, f, 16) for f in (1 / 4, 1 / 2, 3 / 4)] == [6, 4, 2]  # halved for a small group
    assert keep_count(3, 0.9, 1) == 1 and keep_count(1, 0.75, 16) == 1
    assert preferred_multiple(optic.targets.get("a100")) == 8
    assert preferred_multiple(optic.targets.get("a100"), torch.float16) == 16
    assert preferred_multiple(CPU) == (CPU.vector_lanes_fp32 or 8)


def test_selection_keeps_whole_heads_and_positions_expand_blocks():
    imp = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 9])  # heads of 4: 1, 8, 9
    assert select_channels(imp, 2, 4).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert select_channels(imp, 2).tolist() == [4, 11]  # ties: the first
    assert removed_positions(torch.tensor([1, 3]), 2, 2).tolist() == [4, 5, 8, 9]
    assert removed_positions(torch.tensor([4, 5, 6, 7]), 0, Fraction(1, 4)).tolist() == [1]


# -- surgery --------------------------------------------------------------------------------------------------------
def zero_channels(model: nn.Module, layers: list[str], bns: list[str], channels: list[int]) -> None:
    """Make ``channels`` of the producers ``layers`` exactly zero after their BatchNorms."""
    with torch.no_grad():
        for name in layers:
            m = model.get_submodule(name)
            m.weight[channels] = 0
            if m.bias is not None:
                m.bias[channels] = 0
        for name in bns:
            bn = model.get_submodule(name)
            bn.running_mean[channels] = 0
            bn.bias[channels] = 0


class Mixed(nn.Module):
    """Residual CNN with a concat, a depthwise conv, pooling and a flatten into a linear."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.side = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(12, 4, 1)
        self.fc1, self.fc2 = nn.Linear(4 * 3 * 3, 16), nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.bn0(self.stem(x)))
        y = F.relu(y + self.bn1(self.conv(y)))
        y = torch.cat([F.relu(self.dw(y)), F.relu(self.side(x))], 1)
        y = F.adaptive_avg_pool2d(F.relu(self.mix(y)), 3)
        return self.fc2(F.gelu(self.fc1(torch.flatten(y, 1))))


def _randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g) * 0.3 + 1)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_pruning_nothing_is_exact(method):
    model, x = _randomize(Mixed()), torch.randn(2, 3, 6, 6)
    prog = capture(model, (x,), method=method)
    assert get("prune").run(prog, ctx_for()) is False  # no prune_fraction: no change
    ref = prog.run()
    for g in analyse(prog.gm).groups:
        if g.reason is None:
            prune_group(prog, g.key, g.n, torch.arange(g.n))
    assert torch.equal(prog.run(), ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_pruning_zero_channels_is_exact_and_params_drop_as_predicted(method, importance):
    model, x = _randomize(Mixed()), torch.randn(4, 3, 6, 6)
    zero_channels(model, ["stem", "conv"], ["bn0", "bn1"], [1, 4, 6, 7])  # the residual group (dw follows it)
    zero_channels(model, ["side"], [], [0, 2])
    zero_channels(model, ["mix"], [], [3, 1])
    zero_channels(model, ["fc1"], [], list(range(0, 16, 2)))
    with torch.no_grad():
        ref = model(x)
    prog = capture(model, (x,), method=method)
    before = prog.param_count()
    cal = split([torch.randn(8, 3, 6, 6) for _ in range(2)], Budget(), single_input=True, batch_size=None)
    ctx = ctx_for(prune_fraction=0.5, prune_multiple=1, prune_importance=importance, calibration=cal)
    assert get("prune").run(prog, ctx) is True
    assert ctx.stats.matched == {"prune": 4}  # stem+conv (coupled by the add), side, mix, fc1
    with torch.no_grad():
        got = prog.run()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    # residual group (8 → 4): stem rows + bias, bn0 (4 tensors), conv rows and columns + bias, bn1, dw rows
    residual = 4 * 28 + 4 * 4 + (8 * 8 - 4 * 4) * 9 + 4 + 4 * 4 + 4 * 9
    side = 2 * 3 + 2  # side (4 → 2): rows + bias
    mix = 4 * 12 - 2 * 6 + 2  # mix: 8 + 2 of its 12 input channels go, and 2 of its 4 outputs
    fc1 = 16 * 36 - 8 * 18 + 8  # fc1: 2 of mix's channels (9 features each) and 8 of its 16 neurons
    fc2 = 5 * 8
    expected = before - (residual + side + mix + fc1 + fc2)
    assert prog.param_count() == expected, (prog.param_count(), expected)


@pytest.mark.parametrize("method", METHODS)
def test_attention_heads_prune_whole_and_fix_the_view_sizes(method):
    model, x = SdpaBlock().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():  # heads 1 and 3 of v produce zeros: their removal changes nothing
        for h in (1, 3):
            model.v.weight[4 * h:4 * h + 4] = 0
            model.v.bias[4 * h:4 * h + 4] = 0
        ref = model(x)
    prog = capture(model, (x,), method=method)
    g = next(g for g in analyse(prog.gm).groups if ir.layer_name(g.producers[0]) == "q")
    assert g.unit == 4 and g.reason is None
    keep = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    prune_group(prog, g.key, g.n, keep)
    prog.recompile()
    with torch.no_grad():
        got = prog.run()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    views = [n for n in prog.gm.graph.nodes if n.op in ("call_method", "call_function")
             and getattr(n.target, "__name__", n.target) in ("view", "view.default")]
    assert len(views) == 3
    prog.annotate_shapes()
    assert all(ir.shape(n)[2] == 2 for n in views)  # two heads left


class FusedQkv(nn.Module):
    """GPT-2's spelling: one linear for q, k and v, split by one chunk size."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.h, self.qkv, self.o = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        parts = self.qkv(x).split(d, dim=2)
        q, k, v = (parts[i].view(b, t, self.h, d // self.h).transpose(1, 2) for i in range(3))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.o(y) + 1.0


def _zero_heads(linear: nn.Linear, heads, dh: int, offset: int = 0) -> None:
    with torch.no_grad():
        for h in heads:
            linear.weight[offset + dh * h:offset + dh * h + dh] = 0
            linear.bias[offset + dh * h:offset + dh * h + dh] = 0


@pytest.mark.parametrize("method", METHODS)
def test_heads_of_a_split_qkv_are_pieces_of_one_producer(method):
    model, x = FusedQkv().eval(), torch.randn(2, 5, 16)
    _zero_heads(model.qkv, [0, 2], 4, offset=32)  # v's heads 0 and 2
    with torch.no_grad():
        ref = model(x)
    prog = capture(model, (x,), method=method)
    g = next(g for g in analyse(prog.gm).groups if g.unit == 4)
    name = g.producers[0].name
    assert g.key == (f"{name}[0]", f"{name}[1]", f"{name}[2]") and g.n == 16 and g.reason is None
    before = prog.param_count()
    prune_group(prog, g.key, g.n, torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]))
    with torch.no_grad():
        got = prog.run()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert before - prog.param_count() == 3 * 8 * (16 + 1) + 8 * 16  # q, k, v rows of two heads; o's columns


def test_fuse_then_prune_keeps_heads_of_the_fused_projection():
    model, x = SdpaBlock().eval(), torch.randn(2, 5, 16)
    _zero_heads(model.v, [1, 3], 4)
    with torch.no_grad():
        ref = model(x)
    prog = capture(model, (x,), method="export")
    assert get("fuse").run(prog, ctx_for())
    prog.annotate_shapes()
    g = next(g for g in analyse(prog.gm).groups if g.unit == 4)
    assert len(g.key) == 3 and len(g.producers) == 1  # q, k and v are pieces of the fused linear
    prune_group(prog, g.key, g.n, torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]))
    with torch.no_grad():
        got = prog.run()
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    split = next(n for n in prog.gm.graph.nodes if "split" in n.name)
    assert split.args[1] == [8, 8, 8]


class Functional(nn.Module):
    """Parameters read through get_attr and functional calls (F.conv2d with groups, F.layer_norm)."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 3, 1, 1)), nn.Parameter(torch.randn(8))
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.w2 = nn.Parameter(torch.randn(6, 8))
        self.g, self.b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
        self.w3 = nn.Parameter(torch.randn(2, 6))

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1))
        y = F.conv2d(y, self.dw, None, 1, 1, 1, 8).mean((2, 3))
        y = F.layer_norm(F.linear(y, self.w2), (6,), self.g, self.b)
        return F.linear(F.relu(y), self.w3)


@pytest.mark.parametrize("method", METHODS)
def test_functional_spellings_slice_their_constants_and_literals(method):
    model, x = Functional().eval(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        model.w1[[2, 5]] = 0
        model.b1[[2, 5]] = 0
        ref = model(x)
    prog = capture(model, (x,), method=method)
    groups = analyse(prog.gm).groups
    assert [g.reason for g in groups][:2] == [None, None]
    prune_group(prog, groups[0].key, 8, torch.tensor([0, 1, 3, 4, 6, 7]))
    prune_group(prog, groups[1].key, 6, torch.tensor([0, 2, 3, 5]))  # LayerNorm over 4 channels: lossy
    with torch.no_grad():
        got = prog.run()
    assert got.shape == ref.shape
    conv = next(n for n in prog.gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)
                and 6 in n.args)  # the depthwise conv now has 6 groups
    assert conv is not None
    ln = next(n for n in prog.gm.graph.nodes if "layer_norm" in str(n.target))
    assert list(ln.args[1]) == [4]


def test_adjacent_and_concatenated_groups_compose_in_any_order():
    model, x = _randomize(Mixed()), torch.randn(2, 3, 6, 6)
    base = capture(model, (x,), method="export")
    actions = get("prune").candidates(base, ctx_for(prune_multiple=1))
    by_group: dict[str, list] = {}
    for a in actions:
        by_group.setdefault(a.group, []).append(a)
    strongest = [max(levels, key=lambda a: a.level) for levels in by_group.values()]
    assert len(strongest) == 4
    for order in (strongest, strongest[::-1]):
        prog = build(base, order)
        assert prog.run().shape == (2, 5)
    # one node is rewritten by one group only: adjacent groups never conflict
    assert not any(a.nodes & b.nodes for a in strongest for b in strongest if a is not b)


def test_candidates_describe_levels_and_predict_a_gain():
    model, x = Ffn(d=32, hidden=256).eval(), torch.randn(16, 32)
    prog = capture(model, (x,))
    actions = get("prune").candidates(prog, ctx_for(prune_multiple=16))
    assert [a.info["channels"] for a in actions] == [(256, 224), (256, 192), (256, 160), (256, 128), (256, 96), (256, 64)]
    a = actions[1]
    assert a.group == "prune:fc1" and a.layer == "fc1" and a.nodes == frozenset({"fc1"})
    assert a.describe == "prune 64 of 256 channels (magnitude importance)" and a.level == pytest.approx(0.25)
    assert all(0 < b.predicted_gain_s < c.predicted_gain_s for b, c in zip(actions, actions[1:], strict=False))
    small = build(prog, [actions[-1]])
    assert small.param_count() == prog.param_count() - 192 * (32 + 1 + 32)


def test_measured_levels_must_be_faster_here():
    model, x = Ffn(d=256, hidden=1024).eval(), torch.randn(64, 256)
    prog = capture(model, (x,))
    ctx = ctx_for(measure=True, prune_multiple=256, prune_measure_s=0.1)
    actions = get("prune").candidates(prog, ctx)
    assert all(a.info["region_s"][1] < a.info["region_s"][0] for a in actions)
    assert any(a.info["channels"] == (1024, 256) for a in actions)  # removing 3/4 is faster on any machine
    declined = [why for _, _, why in ctx.stats.declined if "not faster here" in why]
    assert len(actions) + len(declined) == 3


# -- before and after: op kinds and channel counts of small models pruned by prune_fraction ---------------------
def layers(prog) -> list[str]:
    """Every op on tensors in graph order: its kind, with channel counts for layers and norms (in→out)
    and the output shape of reshapes."""
    prog.annotate_shapes()
    out = []
    for node in prog.gm.graph.nodes:
        op, y = view(node, prog.gm), ir.shape(node)
        if op is None or y is None:
            continue
        x = ir.shape(op.x) if isinstance(op.x, torch.fx.Node) else None
        if op.kind == "conv":
            out.append(f"conv {x[1]}→{y[1]}")
        elif op.kind == "linear":
            out.append(f"linear {x[-1]}→{y[-1]}")
        elif op.kind == "batch_norm":
            out.append(f"batch_norm {y[1]}")
        elif op.kind in ("reshape", "flatten"):
            out.append(f"{op.kind} {list(y)}")
        else:
            out.append(op.kind)
    return out


BEFORE_AFTER = {
    # conv2's channels reach the output: only conv1's group (with its BatchNorm) is pruned
    "conv_bn_conv": (ConvBnConv, (2, 3, 6, 6), dict(prune_fraction=0.5, prune_multiple=1), 1,
                     ["conv 3→8", "batch_norm 8", "act", "conv 8→4"],
                     ["conv 3→4", "batch_norm 4", "act", "conv 4→4"]),
    # a quarter of 32 neurons, kept in multiples of 8
    "ffn": (Ffn, (2, 3, 8), dict(prune_fraction=0.25, prune_multiple=8), 1,
            ["linear 8→32", "act", "linear 32→8"],
            ["linear 8→24", "act", "linear 24→8"]),
    # half of every group: the residual stream (stem, conv and the depthwise dw), side, mix (each of its
    # channels is 9 features after the flatten) and fc1
    "mixed": (Mixed, (2, 3, 6, 6), dict(prune_fraction=0.5, prune_multiple=1), 4,
              ["conv 3→8", "batch_norm 8", "act", "conv 8→8", "batch_norm 8", "add", "act", "conv 8→8", "act",
               "conv 3→4", "act", "cat", "conv 12→4", "act", "pool", "flatten [2, 36]", "linear 36→16", "act",
               "linear 16→5"],
              ["conv 3→4", "batch_norm 4", "act", "conv 4→4", "batch_norm 4", "add", "act", "conv 4→4", "act",
               "conv 3→2", "act", "cat", "conv 6→2", "act", "pool", "flatten [2, 18]", "linear 18→8", "act",
               "linear 8→5"]),
    # two of four heads of q/k/v (the view sizes follow), and half of fc1; the residual stream is the input
    "sdpa_block": (SdpaBlock, (2, 5, 16), dict(prune_fraction=0.5, prune_multiple=1), 2,
                   ["linear 16→16", "reshape [2, 5, 4, 4]", "transpose", "linear 16→16", "reshape [2, 5, 4, 4]",
                    "transpose", "linear 16→16", "reshape [2, 5, 4, 4]", "transpose", "sdpa", "transpose",
                    "reshape [2, 5, 16]", "linear 16→16", "add", "linear 16→32", "act", "linear 32→16", "add"],
                   ["linear 16→8", "reshape [2, 5, 2, 4]", "transpose", "linear 16→8", "reshape [2, 5, 2, 4]",
                    "transpose", "linear 16→8", "reshape [2, 5, 2, 4]", "transpose", "sdpa", "transpose",
                    "reshape [2, 5, 8]", "linear 8→16", "add", "linear 16→16", "act", "linear 16→16", "add"]),
}


@pytest.mark.parametrize("case", list(BEFORE_AFTER))
def test_before_and_after_pruning(case):
    make, shape, options, groups, before, expected = BEFORE_AFTER[case]
    prog = capture(make().eval(), (torch.randn(*shape),), method="fx")
    assert layers(prog) == before
    ref = prog.run()
    ctx = ctx_for(**options)
    assert get("prune").run(prog, ctx) is True
    assert layers(prog) == expected
    assert ctx.stats.matched == {"prune": groups}
    assert prog.run().shape == ref.shape


# -- property: every level of every group keeps a runnable graph of the same output shape ---------------------------
@given(st.one_of(cnn_models(), mlp_models(), token_models()), st.sampled_from(METHODS),
       st.sampled_from([1 / 8, 1 / 4, 1 / 2, 3 / 4]), st.sampled_from([1, 4]))
def test_any_level_of_any_group_keeps_the_output_shape(model_and_inputs, method, fraction, multiple):
    model, inputs = model_and_inputs
    prog = capture(model, inputs, method=method)
    ref = prog.run()
    prog_all = prog.clone()
    assert get("prune").run(prog_all, ctx_for(prune_fraction=fraction, prune_multiple=multiple)) in (True, False)
    assert prog_all.run().shape == ref.shape
    for g in analyse(prog.gm).groups:
        if g.reason is None and g.n // g.unit > 1:
            one = prog.clone()
            keep_units = keep_count(g.n // g.unit, fraction, multiple)
            prune_group(one, g.key, g.n, select_channels(torch.rand(g.n), keep_units, g.unit))
            one.recompile()
            assert one.run().shape == ref.shape


def test_optimize_spends_a_budget_on_pruning():
    model, x = _randomize(Mixed()), torch.randn(8, 3, 6, 6)
    data = [torch.randn(8, 3, 6, 6) for _ in range(4)]
    fast = optic.optimize(model, (x,), passes=["prune"], budget=optic.Budget(max_drop=0.3, metric="rel_error"),
                          calibration=data, measure=False)
    rows = [r for r in fast.report.budget["actions"] if r["pass"] == "prune"]
    assert rows and all(r["importance"] == "activation" for r in rows)
    assert any(r["status"] == "kept" for r in rows) and fast.report.budget["holdout_drop"] <= 0.3
    assert fast(x).shape == model(x).shape and fast.program.param_count() < capture(model, (x,)).param_count()
