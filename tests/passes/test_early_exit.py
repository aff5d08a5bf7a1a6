"""early_exit: cut points at block boundaries, segments that chain exactly, the runner's exits at
batch 1 and batch > 1 (exited samples leave the batch; everybody continues on an export graph specialized to
its batch, dynamic=False), and the
calibrated pass on a trained model within its budget."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optic.targets
from optic.budget.calibration import Budget, Evaluator, split
from optic.ir.capture import capture
from optic.passes.early_exit import EarlyExit
from optic.passes.early_exit.cuts import block_boundaries, choose_cuts, exit_candidates
from optic.passes.early_exit.heads import ExitHead, confidence, feature_width, train_heads
from optic.passes.early_exit.runner import make_runner, side_nodes
from optic.passes.early_exit.thresholds import NEVER, executed_fraction
from optic.pipeline.report import PassRecord
from optic.pipeline.runner import PassContext

CPU = optic.targets.get("cpu")


# -- models ----------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1, self.b1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.c2(F.relu(self.b1(self.c1(x)))))


class ResNet(nn.Module):
    """Stem, four residual blocks, a linear on the flattened map (a batch-specialized view in export)."""

    def __init__(self, classes=4, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(4)])
        self.fc = nn.Linear(c * 8 * 8, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(x.view(x.size(0), -1))


class Layer(nn.Module):
    """Pre-norm encoder layer, attention written out, an additive padding mask."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, bias):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads) + bias
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    def __init__(self, vocab=16, d=16, layers=3, classes=4, length=8):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, length, d) * 0.1)
        self.layers = nn.ModuleList(Layer(d) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, ids):
        bias = (ids == 0)[:, None, None, :].float() * -1e4  # a side value every layer reads
        x = self.emb(ids) + self.pos
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(self.norm(x).mean(1))


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 16)
        self.layers = nn.Sequential(*[nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
                                      for _ in range(3)])
        self.fc = nn.Linear(16, 4)

    def forward(self, ids):
        return self.fc(self.layers(self.emb(ids)).mean(1))


class Dense(nn.Module):
    """Every block's output is read by the final concat: no cut between the blocks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        feats = [F.relu(self.stem(x))]
        for b in self.blocks:
            feats.append(F.relu(b(feats[-1])))
        return self.fc(torch.cat(feats, 1).mean((2, 3)))


def token_batch(n, gen, length=8):
    ids = torch.randint(1, 16, (n, length), generator=gen)
    ids[: n // 2, length - 2:] = 0  # padding
    return ids


# -- an easy task ------------------------------------------------------------------------------------
_G = torch.Generator().manual_seed(1)
TEMPLATES = torch.randn(4, 3, 8, 8, generator=_G) + 0.4 * torch.randn(4, 3, 1, 1, generator=_G)  # pattern, colour


def blobs(n, gen):
    """Class templates scaled by a random amplitude plus noise: most samples are easy, some are not."""
    y = torch.randint(4, (n,), generator=gen)
    amp = torch.rand(n, generator=gen) * 1.6 + 0.3
    return TEMPLATES[y] * amp[:, None, None, None] + torch.randn(n, 3, 8, 8, generator=gen), y


@pytest.fixture(scope="module")
def trained():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ResNet()
        gen = torch.Generator().manual_seed(2)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(150):
            x, y = blobs(64, gen)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def context(program, data, max_drop, metric="agreement", labels=False, batch_size=None, measure=False):
    budget = Budget(max_drop=max_drop, metric=metric)
    batches = [(x, y) if labels else x for x, y in data]
    cal = split(batches, budget, single_input=True, batch_size=batch_size)
    ev = Evaluator(budget, cal, program.gm)
    steps = []
    ctx = PassContext(target=CPU, budget=budget, calibration=cal, evaluator=ev, budget_left=max_drop,
                      record=PassRecord("early_exit", False), measure=measure,
                      progress=lambda what, done, total: steps.append((what, done, total)))
    return ctx, steps


def blob_data(n_batches=8, size=64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [blobs(size, gen) for _ in range(n_batches)]


def random_heads(program, cuts, classes=4):
    by_name = {n.name: n for n in program.gm.graph.nodes}
    heads = []
    for c in cuts:
        s = tuple(by_name[c].meta["tensor_meta"].shape)
        heads.append(ExitHead(len(s), feature_width(s), classes).eval())
    return heads


# -- where -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fx", "export"])
def test_cuts_of_a_residual_cnn_are_block_outputs(method):
    prog = capture(ResNet().eval(), (torch.randn(2, 3, 8, 8),), method=method)
    # after the stem's relu, after each block's relu, and the flattened map; never inside a block
    assert block_boundaries(prog.gm) == ["relu", "relu_2", "relu_4", "relu_6", "relu_8", "view"]
    cands = exit_candidates(prog, CPU)
    assert [c.module for c in cands[:5]] == ["", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    fractions = [c.fraction for c in cands]
    assert fractions == sorted(fractions) and 0 < fractions[0] < 0.15 and fractions[-1] > 0.9
    chosen = choose_cuts(prog, cands, 3)
    assert [c.node for c in chosen] == ["relu_2", "relu_4", "relu_6"]  # near 25 %, 50 %, 75 % of the cost


@pytest.mark.parametrize("method, expected", [
    ("fx", ["emb", "add", "add_2", "add_3", "add_5", "add_6", "add_8", "norm", "mean"]),
    ("export", ["embedding", "add", "add_2", "add_3", "add_5", "add_6", "add_8", "layer_norm_6", "mean"]),
])
def test_cuts_of_a_transformer_pass_the_mask_along(method, expected):
    prog = capture(Encoder().eval(), (token_batch(4, torch.Generator().manual_seed(0)),), method=method)
    # after each residual sub-block (attention, MLP) of the pre-norm layers; the padding mask is a
    # side value that crosses every cut, and the final norm finishes the last layer's output
    assert block_boundaries(prog.gm) == expected
    cuts = ["add_3", "add_6"]  # after layers 0 and 1
    runner = make_runner(prog, cuts, random_heads(prog, cuts), [NEVER] * 2)
    side, by_name = side_nodes(prog.gm), {n.name: n for n in prog.gm.graph.nodes}
    for seg, cut in zip(runner.segments[1:], cuts, strict=True):
        others = [name for name in seg.inputs if name != cut]
        assert others and all(by_name[name] in side for name in others), seg.inputs  # the mask, no stream


def test_cuts_of_torch_encoder_layers_are_the_layers():
    prog = capture(TorchEncoder().eval(), (token_batch(4, torch.Generator().manual_seed(0)),), method="fx")
    assert block_boundaries(prog.gm) == ["emb", "layers_0", "layers_1", "layers_2", "mean"]


def test_no_cut_where_earlier_values_are_read_later():
    prog = capture(Dense().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    # the stem's output is alone; after it every block's output stays live until the concat
    assert block_boundaries(prog.gm) == ["relu", "cat", "mean"]


# -- segments and runner ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("make", [lambda: (ResNet(), torch.randn(4, 3, 8, 8)),
                                  lambda: (Encoder(), token_batch(4, torch.Generator().manual_seed(0)))],
                         ids=["cnn", "transformer"])
def test_segments_chain_to_the_original_output_exactly(make, method):
    model, x = make()
    prog = capture(model.eval(), (x,), method=method)
    cuts = block_boundaries(prog.gm)
    runner = make_runner(prog, cuts, random_heads(prog, cuts), [NEVER] * len(cuts))
    assert len(runner.segments) == len(cuts) + 1
    env = dict(zip(runner.input_names, prog.flat_inputs(), strict=True))
    with torch.no_grad():
        chained = runner.run_segments(env)[-1][runner.logits]
        assert torch.equal(chained, prog.gm(x))
        assert torch.equal(runner(x), prog.gm(x))  # never confident: the original's output
    assert runner.exit_counts == [0] * len(cuts) + [4]
    # the segments read the original's weights, not copies
    mine = {id(t) for s in runner.segments for t in list(s.parameters()) + list(s.buffers())}
    assert mine and mine <= {id(t) for t in list(prog.gm.parameters()) + list(prog.gm.buffers())}


@pytest.mark.parametrize("method", ["fx", "export"])
def test_threshold_zero_exits_everybody_at_the_first_head(method):
    prog = capture(ResNet().eval(), (torch.randn(4, 3, 8, 8),), method=method)
    cuts = ["relu_2", "relu_4"]
    heads = random_heads(prog, cuts)
    runner = make_runner(prog, cuts, heads, [0.0, 0.0])
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        feature = runner.run_segments(dict(zip(runner.input_names, [x], strict=True)))[0]["relu_2"]
        assert torch.equal(runner(x), heads[0](feature))
    assert runner.exit_counts == [4, 0, 0]
    runner.reset_counts()
    assert runner.exit_counts == [0, 0, 0]


def _half_confident(runner, x):
    """A first threshold that about half of ``x`` reaches."""
    with torch.no_grad():
        feature = runner.run_segments(dict(zip(runner.input_names, [x], strict=True)))[0][runner.cuts[0]]
        conf = confidence(runner.heads[0](feature))
    return float(conf.median()), conf


CASES = {"cnn": (ResNet, lambda gen: torch.randn(8, 3, 8, 8, generator=gen), ["relu_2", "relu_4"]),
         "transformer": (Encoder, lambda gen: token_batch(8, gen), ["add_3", "add_6"])}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method, dynamic", [("fx", "auto"), ("export", "auto"), ("export", False)])
def test_batch_behaviour(case, method, dynamic):
    """Samples that exited leave the batch (the transformer's mask is sliced with them) where the later
    segments run on part of the batch: fx graphs, and the export CNN with its dynamic batch (the default).
    Everybody continues until all have exited where they cannot: export with dynamic=False (a view to
    [8, 512], reshapes to [8, 8, 2, 8]), and the export transformer, whose head-split view takes the batch
    size computed before the cut as a number. Each sample's output is the same either way, and the same as
    at batch 1."""
    subset = method == "fx" or (dynamic == "auto" and case == "cnn")
    make, inputs, cuts = CASES[case]
    gen = torch.Generator().manual_seed(0)
    prog = capture(make().eval(), (inputs(gen),), method=method, dynamic=dynamic)
    runner = make_runner(prog, cuts, random_heads(prog, cuts), [NEVER, NEVER])
    x = inputs(gen)
    assert (runner.probe_subbatch(prog.flat_inputs((inputs(gen),), {}), 1e-4) is None) == subset
    assert runner.subset == subset
    t, conf = _half_confident(runner, x)
    runner.thresholds = [t, NEVER]
    seen = []
    runner.segments[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0][cuts[0]].shape[0]))
    with torch.no_grad():
        got = runner(x)
        ref = prog.gm(x)
    exited = conf >= t
    assert 0 < int(exited.sum()) < 8
    assert seen == [8 - int(exited.sum())] if subset else seen == [8]
    assert runner.exit_counts == [int(exited.sum()), 0, 8 - int(exited.sum())]
    assert torch.allclose(got[~exited], ref[~exited], atol=1e-5)
    assert not torch.allclose(got[exited], ref[exited])
    if subset:  # batch 1: a real early return, the same answer per sample
        with torch.no_grad():
            for i in range(8):
                assert torch.allclose(runner(x[i:i + 1])[0], got[i], atol=1e-5)


def test_heads_train_deterministically_and_fold_their_standardization():
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(64, 8, generator=gen) * 5 + 3, torch.randn(64, 6, generator=gen)]
    teacher = feats[0][:, :4] * 2

    def fit():
        heads = [ExitHead(2, 8, 4), ExitHead(3, 6, 4)]
        train_heads(heads, feats, teacher, None, steps=300, seed=1)
        return heads

    a, b = fit(), fit()
    for ha, hb in zip(a, b, strict=True):
        for pa, pb in zip(ha.parameters(), hb.parameters(), strict=True):
            assert torch.equal(pa, pb)
    # the folded head agrees with the teacher on what it was trained on
    agree = (a[0].classify(feats[0]).argmax(-1) == teacher.argmax(-1)).float().mean()
    assert agree > 0.9


def test_expected_fraction_of_cost():
    # half the samples leave after the first of two equal segments (heads cost nothing)
    assert executed_fraction([0.5, 0.5], [1.0, 1.0], [0.0]) == pytest.approx(0.75)
    assert executed_fraction([0.0, 1.0], [1.0, 1.0], [0.1]) == pytest.approx(1.05)


# -- the calibrated pass -------------------------------------------------------------------------------
def test_pass_within_budget_exits_most_samples_early(trained):
    prog = capture(trained, (torch.randn(2, 3, 8, 8),), method="fx")
    code = prog.gm.code
    ctx, steps = context(prog, blob_data(), 0.03, measure=True)
    assert EarlyExit().run(prog, ctx)
    assert prog.gm.code == code  # the whole graph stays as it was; the runner is beside it
    m = ctx.record.measured
    exits = m["exits"]
    assert 1 <= len(exits) <= 3 and m["batch_subset"]
    assert [e["node"] for e in exits] == sorted((e["node"] for e in exits), key=["relu_2", "relu_4", "relu_6"].index)
    assert sum(e["holdout_exit_rate"] for e in exits) >= 0.5  # a large share leaves early
    assert m["expected_speedup"] > 1.2 and m["measured_speedup"] > 0
    assert ctx.evaluator.drop(prog, "holdout") <= 0.03  # Program calls its runner
    assert any(what == "training exit heads" and done == total for what, done, total in steps)
    assert ctx.stats.matched == {"early_exit": len(exits)}


def test_budget_zero_keeps_no_exit_that_changes_a_prediction(trained):
    prog = capture(trained, (torch.randn(2, 3, 8, 8),), method="fx")
    ctx, _ = context(prog, blob_data(), 0.0, metric="top1", labels=True)
    changed = EarlyExit().run(prog, ctx)
    if changed:  # what exits on the fit split gives the model's own answer
        with torch.no_grad():
            for b in ctx.calibration.fit:
                assert torch.equal(prog.runner(*b.args).argmax(-1), prog.gm(*b.args).argmax(-1))
    else:
        assert "no exit" in " ".join(ctx.record.notes)


def test_pass_on_a_batch_specialized_export_graph_notes_that_batching_defeats_exits(trained):
    prog = capture(trained, (torch.randn(16, 3, 8, 8),), method="export", dynamic=False)
    ctx, _ = context(prog, blob_data(), 0.03, batch_size=16)
    assert EarlyExit().run(prog, ctx)
    assert not prog.runner.subset
    assert any("batching defeats exits" in n for n in ctx.record.notes)
    assert ctx.evaluator.drop(prog, "holdout") <= 0.03


# -- declines ----------------------------------------------------------------------------------------------
class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ResNet()

    def forward(self, x):
        y = self.net(x)
        return y, y.softmax(-1)


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = ResNet(classes=1)

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("model, reason", [(TwoOutputs, "returns 2 values"), (Regressor, "not [N, K] float logits")])
def test_declines_what_is_not_a_classifier(model, reason):
    prog = capture(model().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    ctx, _ = context(prog, blob_data(2, 16), 0.05, metric="rel_error")
    assert not EarlyExit().run(prog, ctx)
    assert prog.runner is None
    assert any(reason in why for _, _, why in ctx.stats.declined)


def test_declines_without_calibration():
    prog = capture(ResNet().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    ctx = PassContext(target=CPU, record=PassRecord("early_exit", False))
    assert not EarlyExit().run(prog, ctx)
    assert "calibration" in ctx.record.notes[0]

