"""early_exit: cut points at block boundaries (and the guard that declines some by node), segments that
chain exactly (the graph before and its segments and exits after, as op kinds), the runner's exits at batch 1
and batch > 1 (exited samples leave the batch; everybody continues on an export graph specialized to its
batch, dynamic=False), saved runners loading by their module path, the heads' distillation and cross-fitting,
the threshold search on its own (within the budget, monotonic in it), and the calibrated pass on a trained
model within its budget."""

from __future__ import annotations

import io
import itertools
import math
import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optic.targets
from optic.budget.calibration import Budget, Evaluator, split
from optic.ir.capture import capture
from optic.ir.graph import is_shape_query
from optic.ir.opview import kind_of
from optic.ir.rewrite import MODEL, RuleStats
from optic.passes.early_exit import EarlyExit
from optic.passes.early_exit.cuts import block_boundaries, choose_cuts, exit_candidates
from optic.passes.early_exit.heads import (
    ExitHead,
    confidence,
    distill_loss,
    feature_width,
    out_of_fold_logits,
    train_heads,
)
from optic.passes.early_exit.runner import EarlyExitRunner, Segment, make_runner, side_nodes
from optic.passes.early_exit.thresholds import NEVER, ThresholdSearch, executed_fraction, threshold_levels
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


class IndexStream(nn.Module):
    """A stream value that is an integer map (argmax over channels), embedded again afterwards."""

    def __init__(self):
        super().__init__()
        self.conv, self.emb, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Embedding(4, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.emb(self.conv(x).argmax(1)).mean((1, 2)))


class PooledLinear(nn.Module):
    """One linear on a parameter-free function of the input: nothing before it to cut after."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class LateBoundary(nn.Module):
    """Its one boundary, the wide linear's output, comes after nearly all of the cost."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(192, 1024), nn.Linear(1024, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x.flatten(1)))


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


def test_choose_cuts_declines_a_feature_no_head_reads_by_its_node():
    prog = capture(IndexStream().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    assert block_boundaries(prog.gm) == ["conv", "argmax", "emb", "mean"]
    stats = RuleStats()
    chosen = choose_cuts(prog, exit_candidates(prog, CPU), 4, stats, latest=1.0)
    assert [c.node for c in chosen] == ["conv", "emb", "mean"]
    assert list(stats.declined) == [
        ("early_exit", "argmax", "feature is [2, 8, 8] int64: heads read 2-D/3-D/4-D float or uint8")]


def test_choose_cuts_declines_what_comes_too_late_by_its_node():
    prog = capture(ResNet().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    cands = exit_candidates(prog, CPU)
    stats = RuleStats()
    chosen = choose_cuts(prog, cands, 3, stats, latest=cands[2].fraction)
    assert [c.node for c in chosen] == ["relu", "relu_2", "relu_4"]  # the three early enough
    assert [node for _, node, _ in stats.declined] == ["relu_6", "relu_8", "view"]
    assert all("too little left to skip" in why for _, _, why in stats.declined)


# -- before and after ------------------------------------------------------------------------------
def op_kinds(gm) -> str:
    """The computing nodes of ``gm`` as op kinds, in graph order (shape queries as ``shape``)."""
    return " ".join("shape" if is_shape_query(n) else kind_of(n, gm) or str(n.target)
                    for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output"))


BLOCK = "conv batch_norm act conv add act"


@pytest.mark.parametrize("method, before, segments", [
    ("fx", f"conv act {BLOCK} {BLOCK} {BLOCK} {BLOCK} shape reshape linear", [
        (("x",), f"conv act {BLOCK}", ("relu_2",)),
        (("relu_2",), BLOCK, ("relu_4",)),
        (("relu_4",), BLOCK, ("relu_6",)),
        (("relu_6",), f"{BLOCK} shape reshape linear", ("fc",))]),
    # the batch size is read once at the top of an export graph: it moves to the segment that reads it,
    # and the input travels along to it (a sample that exits never computes it)
    ("export", f"shape conv act {BLOCK} {BLOCK} {BLOCK} {BLOCK} reshape linear", [
        (("x",), f"conv act {BLOCK}", ("relu_2",)),
        (("relu_2",), BLOCK, ("relu_4",)),
        (("relu_4",), BLOCK, ("relu_6",)),
        (("x", "relu_6"), f"shape {BLOCK} reshape linear", ("linear",))]),
])
def test_a_classifier_before_and_its_segments_and_exits_after(method, before, segments):
    prog = capture(ResNet().eval(), (torch.randn(2, 3, 8, 8),), method=method)
    assert op_kinds(prog.gm) == before
    cuts = [c.node for c in choose_cuts(prog, exit_candidates(prog, CPU), 3)]
    runner = make_runner(prog, cuts, random_heads(prog, cuts), [NEVER] * 3)
    assert [(s.inputs, op_kinds(s.gm), s.outputs) for s in runner.segments] == segments
    assert op_kinds(prog.gm) == before  # the graph itself is not touched
    # an exit after each of the first three segments: global average pool of [N, 8, 8, 8], linear 8 → 4
    assert runner.cuts == [s[2][0] for s in segments[:-1]]
    assert [(h.rank, h.norm, tuple(h.fc.weight.shape)) for h in runner.heads] == [(4, None, (4, 8))] * 3


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


def test_a_saved_runner_loads_and_exits_the_same():
    prog = capture(ResNet().eval(), (torch.randn(8, 3, 8, 8),), method="fx")
    cuts = ["relu_2", "relu_4"]
    runner = make_runner(prog, cuts, random_heads(prog, cuts), [NEVER, NEVER])
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    runner.thresholds = [_half_confident(runner, x)[0], NEVER]
    buf = io.BytesIO()
    torch.save(runner, buf)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a pickled TreeSpec warns of its deprecation on load
        loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert loaded.out_spec == runner.out_spec
    with torch.no_grad():
        assert torch.equal(loaded(x), runner(x))
    assert loaded.exit_counts == runner.exit_counts and 0 < loaded.exit_counts[0] < 8


@pytest.mark.parametrize("cls", [EarlyExitRunner, Segment, ExitHead])
def test_results_saved_before_the_split_name_classes_that_still_load(cls):
    # a pickle names a class by module path; files saved before the pass was split name ``segments``
    assert pickle.loads(f"coptic.passes.early_exit.segments\n{cls.__name__}\n.".encode()) is cls


# -- heads -------------------------------------------------------------------------------------------
def test_distill_loss_is_tempered_kl_plus_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    student, teacher, labels, t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen), \
        torch.tensor([0, 1, 2, 3, 0]), 2.0
    p, q = (teacher.double() / t).softmax(-1), (student.double() / t).softmax(-1)
    kl = float((p * (p.log() - q.log())).sum(-1).mean()) * t * t
    ce = float(-student.double().log_softmax(-1)[torch.arange(5), labels].mean())
    assert float(distill_loss(student, teacher, None, t)) == pytest.approx(kl, rel=1e-5)
    assert float(distill_loss(student, teacher, labels, t)) == pytest.approx(kl + ce, rel=1e-5)
    assert float(distill_loss(teacher, teacher, None, t)) == pytest.approx(0.0, abs=1e-6)


def test_out_of_fold_logits_come_from_heads_that_did_not_see_the_sample():
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(40, 8, generator=gen)]
    teacher = feats[0][:, :4] * 3
    heads = [ExitHead(2, 8, 4)]
    untrained = [p.clone() for p in heads[0].parameters()]
    oof = out_of_fold_logits(heads, feats, teacher, None, 2, steps=50, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(untrained, heads[0].parameters(), strict=True))
    for fold in (0, 1):
        held = torch.arange(40) % 2 == fold
        alone = [ExitHead(2, 8, 4)]
        alone[0].load_state_dict(dict(zip(heads[0].state_dict(), untrained, strict=True)))
        train_heads(alone, [feats[0][~held]], teacher[~held], None, steps=50, seed=3)
        with torch.no_grad():
            assert torch.equal(oof[0][held], alone[0].classify(feats[0][held]))


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


# -- thresholds --------------------------------------------------------------------------------------
def test_threshold_levels_go_from_strict_to_loose_and_let_their_share_exit():
    conf = torch.rand(200, generator=torch.Generator().manual_seed(0)) * 0.7 + 0.3
    levels = threshold_levels(conf)
    assert levels == sorted(set(levels), reverse=True) and len(levels) > 10
    assert levels[-1] == float(conf.min())  # the loosest lets everybody exit
    shares = [float((conf >= t).float().mean()) for t in levels]
    assert shares[0] >= 0.01 and shares == sorted(shares)


class Disagreement:
    """An evaluator whose drop is the share of top-1 predictions that differ from the model's own."""

    metric = "agreement"

    def __init__(self, batches, final):
        self.batches, self.reference = batches, [z.argmax(-1) for z in final]

    def drop(self, model, split):
        assert split == "fit"
        differ = sum(int((model(*b.args, **b.kwargs).argmax(-1) != ref).sum())
                     for b, ref in zip(self.batches, self.reference, strict=True))
        return differ / sum(len(ref) for ref in self.reference)


def search_case(allowed, seed=0, n_batches=4, size=32):
    """Two heads over the model's logits: the first noisier than the second, both more often right
    where they are confident."""
    gen = torch.Generator().manual_seed(seed)
    final = [torch.randn(size, 4, generator=gen) * 2 for _ in range(n_batches)]
    heads = [[z + torch.randn(size, 4, generator=gen) * scale for z in final] for scale in (2.0, 1.0)]
    batches = [SimpleNamespace(args=(torch.zeros(size, 1),), kwargs={}) for _ in range(n_batches)]
    spec = torch.utils._pytree.tree_flatten(final[0])[1]
    return ThresholdSearch(heads, final, [1.0, 1.0, 1.0], [0.05, 0.05], spec, Disagreement(batches, final),
                           batches, allowed)


@pytest.mark.parametrize("allowed", [0.0, 0.05, 0.2])
def test_threshold_search_steps_loosen_save_and_stay_within_the_budget(allowed):
    search = search_case(allowed)
    steps = search.search()
    assert len(steps) > 1
    n = sum(search.sizes)
    for (prev, before), (state, res) in itertools.pairwise(steps):
        assert all(b >= a for a, b in zip(prev, state, strict=True)) and state != prev  # only loosens
        assert res.fraction < before.fraction
        assert res.changed <= allowed + 0.5 / n and res.drop <= search.base_drop + allowed + 1e-12
        assert res.drop == pytest.approx(res.changed)  # the replayed outputs are what the exits return
        assert res.thresholds == search.thresholds(state)
        assert sum(res.rates) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_threshold_search_saves_more_with_more_budget(seed):
    finals = [search_case(allowed, seed).search()[-1][1] for allowed in (0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)]
    fractions = [res.fraction for res in finals]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] < fractions[0]
    assert finals[-1].rates[0] == 1.0  # no limit: everybody leaves at the first head


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
    # after: the segments hold the graph's ops in order, each ending at the next exit's cut
    assert " ".join(op_kinds(s.gm) for s in prog.runner.segments) == op_kinds(prog.gm)
    assert [s.outputs for s in prog.runner.segments[:-1]] == [(e["node"],) for e in exits]


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
    [(rule, node, why)] = ctx.stats.declined
    assert rule == "early_exit" and node == "output" and reason in why  # the graph's output node


def test_declines_without_calibration():
    prog = capture(ResNet().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    ctx = PassContext(target=CPU, record=PassRecord("early_exit", False))
    assert not EarlyExit().run(prog, ctx)
    assert "calibration" in ctx.record.notes[0]
    assert [node for _, node, _ in ctx.stats.declined] == [MODEL]


def test_declines_a_model_with_no_block_boundary_as_a_whole():
    prog = capture(PooledLinear().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    ctx, _ = context(prog, blob_data(2, 16), 0.05)
    assert not EarlyExit().run(prog, ctx)
    assert list(ctx.stats.declined) == [
        ("early_exit", MODEL, "no block boundary: no cut of the graph has a single stream value")]


def test_declines_each_boundary_by_its_node_then_the_model_when_none_is_early_enough():
    prog = capture(LateBoundary().eval(), (torch.randn(2, 3, 8, 8),), method="fx")
    ctx, _ = context(prog, blob_data(2, 16), 0.05)
    assert not EarlyExit().run(prog, ctx)
    (_, first, late), last = ctx.stats.declined
    assert first == "fc1" and "too little left to skip" in late
    assert last == ("early_exit", MODEL, "no block boundary with a 2-D/3-D/4-D float feature early enough")



def test_a_batch_1_decision_is_the_float32_comparison_the_batch_path_makes():
    # at batch 1 the runner compares one Python number; it must decide as `confidence >= threshold` on a float32
    # tensor does, or a sample at the boundary would exit at batch 1 and not in a batch (or the reverse)
    from optic.passes.early_exit.runner import float32

    edges = [0.9, 0.7, 1 / 3, 0.95, 0.5]
    for t in edges:
        for conf in (torch.tensor(t, dtype=torch.float32), torch.tensor(t, dtype=torch.float32).nextafter(
                torch.tensor(0.0)), torch.tensor(t, dtype=torch.float32).nextafter(torch.tensor(1.0))):
            assert (float(conf) >= float32(t)) == bool(conf >= t), (t, conf.item())
    assert float(torch.tensor(0.9, dtype=torch.float32)) < 0.9  # a plain Python comparison would differ there


def test_the_float32_rounding_ignores_the_callers_default_device():
    # optimize under torch.set_default_device("meta") (or "cuda") must not make a host-side number a device tensor
    from optic.passes.early_exit.runner import float32

    torch.set_default_device("meta")
    try:
        assert float32(0.9) == float(torch.tensor(0.9, dtype=torch.float32, device="cpu"))
    finally:
        torch.set_default_device(None)


# -- the generated head kernel ------------------------------------------------------------------------------
def _random_head(rank: int, width: int, classes: int = 10, seed: int = 0) -> ExitHead:
    head = ExitHead(rank, width, classes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return head


HEAD_CASES = [(4, (1, 64, 8, 8), "nchw", torch.float32), (4, (3, 20, 3, 5), "cl", torch.float32),
              (4, (2, 64, 4, 4), "cl", torch.uint8), (3, (1, 9, 48), "nchw", torch.float32),
              (3, (4, 5, 33), "nchw", torch.float32), (2, (3, 40), "nchw", torch.float32)]


@pytest.mark.parametrize("rank, shape, layout, dtype", HEAD_CASES)
def test_the_generated_head_computes_the_heads_ops_within_float_rounding(rank, shape, layout, dtype):
    """Pool (either layout, float32 or an int8 kernel's uint8), LayerNorm for tokens, linear and the largest
    softmax probability in one kernel, against the head's own ops."""
    from optic.backend import exit_head

    if exit_head.head_kernel(torch.zeros(shape), 10, None) is None:
        pytest.skip("no generated kernel here (TVM missing)")
    head = _random_head(rank, shape[-1] if rank == 3 else shape[1])
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if dtype == torch.uint8 else torch.randn(shape, generator=g)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = head.classify(head.pool(x))
        logits, conf = head.scores(x)
        assert head._generated(x) is not None  # the kernel ran, not the ops
        assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        assert torch.allclose(conf, confidence(want), rtol=1e-5, atol=1e-6)
        assert torch.equal(head(x), logits)  # forward and scores: one implementation at inference
    with torch.enable_grad():  # training: the ops, with their gradients
        assert head(x).requires_grad and head._generated(x) is None


def test_the_generated_head_follows_its_parameters_and_the_switch(monkeypatch):
    from optic.backend import exit_head

    x = torch.randn(2, 16, 4, 4)
    if exit_head.head_kernel(x, 10, None) is None:
        pytest.skip("no generated kernel here (TVM missing)")
    head, other = _random_head(4, 16, seed=0), _random_head(4, 16, seed=1)
    with torch.no_grad():
        first = head.scores(x)[0]
        head.fc.weight.mul_(2.0)  # changed in place
        assert torch.allclose(head.scores(x)[0], head.classify(head.pool(x)), rtol=1e-5, atol=1e-5)
        head.fc.weight = other.fc.weight  # replaced
        head.fc.bias = other.fc.bias
        assert torch.allclose(head.scores(x)[0], other.scores(x)[0], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(head.scores(x)[0], first)
        copy_ = pickle.loads(pickle.dumps(head))
        assert torch.equal(copy_.scores(x)[0], head.scores(x)[0])
    monkeypatch.setenv(exit_head.ENV, "0")
    fresh = _random_head(4, 16, seed=0)
    with torch.no_grad():
        assert fresh._generated(x) is None
        logits, conf = fresh.scores(x)
        assert torch.equal(logits, fresh.classify(fresh.pool(x))) and torch.equal(conf, confidence(logits))
