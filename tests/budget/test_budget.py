"""The accuracy budget: calibration parsing and splitting, the metric, the allocator, the pipeline's
budget checks, and 2:4 sparsity (the math, and declining where it cannot pay)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import optic
from optic import ir
from optic.budget.allocator import Action, allocate
from optic.budget.calibration import Budget, Evaluator, Labeled, margin_used, record_values, split
from optic.errors import OpticError
from optic.ir.capture import capture
from optic.ir.opview import kind_of
from optic.passes.sparsity import mask_2_4, predicted_seconds, wanda_importance
from optic.pipeline.registry import get
from optic.pipeline.runner import PassContext


def classifier(seed: int = 0, d: int = 16, k: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, k)).eval()


def labeled_batches(model: nn.Module, n: int = 6, b: int = 20, d: int = 16, noisy: float = 0.0):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(b, d, generator=g)
        y = model(x).argmax(-1)
        flip = torch.rand(b, generator=g) < noisy
        y = torch.where(flip, (y + 1) % 4, y)
        out.append((x, y))
    return out


# -- calibration ------------------------------------------------------------------------------------
def test_pair_with_integer_labels_counts_as_labels_for_a_single_input_model():
    x, y = torch.randn(10, 3), torch.arange(10) % 3
    cal = split([(x, y)], Budget(), single_input=True, batch_size=None)
    assert cal.has_labels and cal.sizes == (7, 3)
    # a two-input model reads the same pair as two inputs
    cal2 = split([(x, y)], Budget(), single_input=False, batch_size=None)
    assert not cal2.has_labels and len(cal2.fit[0].args) == 2


def test_a_pair_is_labels_for_a_single_input_model_whatever_their_dtype_and_labeled_is_explicit():
    x, x2 = torch.randn(10, 3), torch.randn(10, 3)
    # a single-input model cannot take x2 as a second input: it is a float target (for a callable metric)
    cal = split([(x, x2)], Budget(), single_input=True, batch_size=None)
    assert cal.has_labels and len(cal.fit[0].args) == 1 and cal.fit[0].labels.shape[1:] == (3,)
    cal = split([Labeled((x, x2), torch.arange(10))], Budget(), single_input=False, batch_size=None)
    assert cal.has_labels and len(cal.fit[0].args) == 2


def test_split_is_disjoint_seeded_and_covers_every_sample():
    x = torch.arange(40.0).reshape(40, 1)
    a = split([x[:15], x[15:]], Budget(holdout=0.25, seed=3), single_input=True, batch_size=None)
    b = split([x[:15], x[15:]], Budget(holdout=0.25, seed=3), single_input=True, batch_size=None)
    fit = torch.cat([bt.args[0] for bt in a.fit]).flatten().tolist()
    hold = torch.cat([bt.args[0] for bt in a.holdout]).flatten().tolist()
    assert len(hold) == 10 and sorted(fit + hold) == list(range(40)) and not set(fit) & set(hold)
    assert hold == torch.cat([bt.args[0] for bt in b.holdout]).flatten().tolist()


def test_fixed_batch_graphs_get_whole_batches():
    x = torch.randn(23, 3)
    cal = split([x], Budget(holdout=0.3), single_input=True, batch_size=4)
    assert all(b.size == 4 and b.args[0].shape[0] == 4 for b in cal.fit + cal.holdout)
    assert any("dropped" in n for n in cal.notes)


@pytest.mark.parametrize("data, message", [
    (None, "needs calibration"),
    ([], "empty"),
    ([torch.randn(1, 3)], "one sample"),
    ([(torch.randn(4, 3), torch.randn(5, 2))], "first dimension"),
    ([(torch.randn(4, 3), torch.arange(4)), torch.randn(4, 3)], "mixes labeled"),
])
def test_bad_calibration_data_gets_a_clear_error(data, message):
    with pytest.raises(OpticError, match=message):
        split(data, Budget(), single_input=True, batch_size=None)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_drop": -0.1}, "max_drop"), ({"metric": "f1"}, "unknown"), ({"holdout": 1.0}, "held-out")])
def test_bad_budget_gets_a_clear_error(kwargs, message):
    with pytest.raises(OpticError, match=message):
        Budget(**kwargs)


# -- metric -------------------------------------------------------------------------------------------
def test_metrics_score_what_they_say():
    m = classifier()
    data = labeled_batches(m, noisy=0.25)
    cal = split(data, Budget(), single_input=True, batch_size=None)
    ev = Evaluator(Budget(metric="top1"), cal, m)
    # labels were flipped for about a quarter of the samples: accuracy ≈ 0.75, agreement with itself 1
    assert 0.6 < ev.base["fit"] < 0.9
    assert Evaluator(Budget(metric="agreement"), cal, m).base["fit"] == 1.0
    assert Evaluator(Budget(metric="rel_error"), cal, m).base["fit"] == 0.0
    # a model that always answers class 0 agrees only where the original said 0
    zero = lambda x: torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 4).float()  # noqa: E731
    ag = Evaluator(Budget(metric="agreement"), cal, m)
    share0 = float(torch.cat([m(b.args[0]).argmax(-1) == 0 for b in cal.fit]).float().mean())
    assert ag.drop(zero, "fit") == pytest.approx(1 - share0)
    # relative error of a scaled model is exactly the scale change
    rel = Evaluator(Budget(metric="rel_error"), cal, m)
    assert rel.drop(lambda x: m(x) * 1.1, "fit") == pytest.approx(0.1, rel=1e-5)
    # a callable metric, higher is better, sees labels when there are labels
    seen = []
    custom = Evaluator(Budget(metric=lambda out, target: seen.append(target.dtype) or 1.0), cal, m)
    assert custom.base["fit"] == 1.0 and seen[0] == torch.int64


def test_top1_budget_counts_broken_samples_and_fixes_do_not_pay_for_them():
    m = classifier()
    data = labeled_batches(m, n=2, noisy=0.5)
    cal = split(data, Budget(holdout=0.5), single_input=True, batch_size=None)
    x = torch.cat([b.args[0] for b in cal.fit])
    y = torch.cat([b.labels for b in cal.fit])
    orig = m(x).argmax(-1)
    # a candidate that answers the label wherever the original was wrong and a wrong class wherever it was right
    flipped = torch.where(orig == y, (y + 1) % 4, y)
    table = {tuple(row.tolist()): int(p) for row, p in zip(x, flipped, strict=True)}
    cand = lambda t: torch.nn.functional.one_hot(  # noqa: E731
        torch.tensor([table[tuple(r.tolist())] for r in t]), 4).float()
    ev = Evaluator(Budget(metric="top1"), cal, m)
    assert ev.drop(cand, "fit") == pytest.approx(float((orig == y).float().mean()))
    assert ev.base["fit"] - ev.score(cand, "fit") < ev.drop(cand, "fit")  # the net drop would hide the breaks


def test_auto_metric_picks_top1_for_logits_and_rel_error_otherwise():
    m = classifier()
    cal = split(labeled_batches(m), Budget(), single_input=True, batch_size=None)
    assert Evaluator(Budget(), cal, m).metric == "top1"
    reg = nn.Linear(16, 1).eval()
    cal_r = split([torch.randn(10, 16)], Budget(), single_input=True, batch_size=None)
    assert Evaluator(Budget(), cal_r, reg).metric == "rel_error"


def test_record_values_probes_fx_and_export_graphs_alike():
    m = classifier()
    x = torch.randn(5, 16)
    for method in ("fx", "export"):
        prog = capture(m, (x,), method=method)
        relu = next(n for n in prog.gm.graph.nodes if kind_of(n, prog.gm) == "act")
        vals = record_values(prog, [relu], [((x,), {})])
        assert torch.allclose(vals[relu.name][0], torch.relu(m[0](x)))


def test_the_risk_of_a_top1_change_is_the_share_of_each_samples_margin_it_used():
    ref = torch.tensor([[3.0, 1.0, 0.0], [0.0, 4.0, 2.0], [1.0, 1.0, 0.0]])
    assert margin_used(ref, ref).tolist() == [0.0, 0.0, 1.0]  # a tie has no margin left to use
    out = torch.tensor([[2.5, 1.5, 0.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0]])
    assert margin_used(out, ref).tolist() == pytest.approx([0.5, 1.0, 1.0])  # half used; flipped; tie
    assert margin_used(out + 7.0, ref).tolist() == pytest.approx([0.5, 1.0, 1.0])  # logits' offset is free
    wider = torch.tensor([[4.0, 1.0, 0.0], [0.0, 4.0, 2.0], [1.0, 1.0, 0.0]])
    assert margin_used(wider, ref)[0] == 0.0  # a wider margin uses none
    m = classifier()
    cal = split(labeled_batches(m), Budget(), single_input=True, batch_size=None)
    ev = Evaluator(Budget(metric="agreement"), cal, m)
    for f in (0.9, 0.5):  # a scaled output flips nothing and uses exactly 1 - f of every margin
        drop, risk = ev.assess(lambda x, f=f: m(x) * f, "fit")
        assert drop == 0.0 and risk == pytest.approx(1 - f)
    assert ev.drop(lambda x: m(x) * 0.5, "fit") == 0.0


# -- allocator ------------------------------------------------------------------------------------------
def _scaler(name: str, factor: float):
    """An action that scales one linear's weight (a stand-in for a lossy change of known cost)."""
    def apply(program):
        gm = program.gm
        node = next(n for n in gm.graph.nodes if n.name == name)
        mod = gm.get_submodule(node.target)
        w = mod.weight.detach() * factor
        with gm.graph.inserting_before(node):
            wn = ir.const_node(gm.graph, gm, w, "w")
            bn = ir.const_node(gm.graph, gm, mod.bias.detach() * factor, "b")
            new = gm.graph.call_function(torch.nn.functional.linear, (node.args[0], wn, bn))
        ir.replace(node, new, "test")
        ir.eliminate_dead_code(gm)
    return apply


def _setup(max_drop: float):
    m = classifier()
    data = labeled_batches(m, n=10)
    prog = capture(m, (data[0][0],))
    budget = Budget(max_drop=max_drop, metric="rel_error")
    cal = split(data, budget, single_input=True, batch_size=None)
    return prog, Evaluator(budget, cal, prog.gm)


def _action(group, node, factor, gain, level=1.0):
    return Action("test", group, node, f"scale {factor}", level, frozenset({node}), gain, _scaler(node, factor))


def test_allocator_prefers_gain_per_drop_and_respects_the_budget():
    prog, ev = _setup(0.06)
    # relative error of scaling the last layer (weight and bias) by f is exactly |1 - f|
    cheap = _action("a", "_2", 0.95, gain=1.0)  # drop 0.05, gain 1 → ratio 20
    costly = _action("b", "_0", 0.8, gain=1.0)  # drop ≈ 0.2·(share of the output from W₂h) alone → over
    alloc = allocate(prog, [costly, cheap], ev, 0.06)
    assert [a.group for a in alloc.kept] == ["a"]
    assert cheap.status == "kept" and costly.status == "over budget"
    assert alloc.holdout_drop <= 0.06 and alloc.fit_drop == pytest.approx(0.05, rel=1e-4)


def test_allocator_takes_the_strongest_level_of_a_group_that_fits():
    prog, ev = _setup(0.12)
    levels = [_action("g", "_2", f, gain=g, level=lv) for f, g, lv in ((0.97, 1, 1), (0.9, 2, 2), (0.8, 4, 3))]
    alloc = allocate(prog, levels, ev, 0.12)
    assert [a.level for a in alloc.kept] == [2]
    assert [a.status for a in levels] == ["superseded", "kept", "over budget"]


def test_allocator_skips_conflicting_actions_and_actions_without_gain():
    prog, ev = _setup(0.5)
    a = _action("a", "_2", 0.99, gain=2.0)
    b = _action("b", "_2", 0.98, gain=1.0)  # same node, other group: conflicts with a
    c = _action("c", "_0", 0.99, gain=0.0)
    alloc = allocate(prog, [a, b, c], ev, 0.5)
    assert alloc.kept == [a] and b.status == "conflict" and c.status.startswith("no predicted gain")


def test_consumers_a_pass_touches_conflict_with_other_passes_only():
    prog, ev = _setup(0.5)
    owner = _action("a", "_0", 0.99, gain=2.0)
    owner.touches = frozenset({"_2"})  # like pruning _0's channels, which slices _2's inputs
    same_pass = _action("b", "_2", 0.99, gain=1.0)  # the same pass composes its own actions
    other = _action("c", "_2", 0.99, gain=1.0)
    other.pass_name = "other"
    alloc = allocate(prog, [owner, same_pass], ev, 0.5)
    assert {a.group for a in alloc.kept} == {"a", "b"}
    allocate(prog, [owner, other], ev, 0.5)
    assert other.status == "conflict"


class _Marked:
    """An evaluator that reads which actions a program carries from its notes: each action alone drops
    nothing and uses up ``risk[name]`` of the margins; A with any other drops everything."""

    base = {"fit": 1.0, "holdout": 1.0}

    def __init__(self, risk: dict[str, float]):
        self.risk, self.evaluations = risk, 0

    def assess(self, program, split="fit"):
        self.evaluations += 1
        done = {n[5:] for n in program.notes if n.startswith("test:")}
        return (1.0 if "A" in done and len(done) > 1 else 0.0), sum(self.risk[a] for a in done)

    def drop(self, program, split="fit"):
        return self.assess(program, split)[0]


def _marked_actions(gains) -> list[Action]:
    def mark(name):
        return lambda program: program.notes.append(f"test:{name}")

    return [Action("test", g, g, g, 1.0, frozenset({g}), gain, mark(g)) for g, gain in gains]


def test_each_actions_risk_alone_is_reported_and_free_actions_still_go_by_gain():
    """The risk (Evaluator.assess) is in every row; it does not order free actions: by gain per risk the
    allocator packed the fit split to the edge of a flip, which did not carry over to held-out data."""
    prog, _ = _setup(0.0)
    acts = _marked_actions((("A", 2.0), ("B", 1.5), ("C", 1.4)))
    alloc = allocate(prog, acts, _Marked({"A": 0.5, "B": 0.05, "C": 0.05}), 0.0)
    assert [a.group for a in alloc.kept] == ["A"]  # the largest gain first; the others would flip with it
    assert [r["risk_alone"] for r in alloc.rows] == [0.5, 0.05, 0.05]


def test_among_equal_gains_the_action_that_risks_less_goes_first():
    """Layers of one shape have the same predicted gain; among them the one that used up less of the fit
    samples' margins goes first, whatever the graph order (which took A here, and A then blocks B and C)."""
    prog, _ = _setup(0.0)
    # the gains are equal, computed along different roads (0.1 + 0.2 against 0.3: not equal as floats)
    acts = _marked_actions((("A", 0.3), ("B", 0.1 + 0.2), ("C", 0.3)))
    alloc = allocate(prog, acts, _Marked({"A": 0.5, "B": 0.05, "C": 0.1}), 0.0)
    assert [a.group for a in alloc.kept] == ["B", "C"]
    assert acts[0].status == "over budget"


def test_allocator_with_a_zero_budget_keeps_only_free_actions():
    prog, ev = _setup(0.0)
    alloc = allocate(prog, [_action("a", "_2", 0.9, gain=1.0)], ev, 0.0)
    assert alloc.kept == [] and alloc.program is prog


@pytest.mark.parametrize("faster", [True, False])
def test_actions_whose_gain_shows_compiled_are_measured_together_compiled(faster):
    """int8 layers pay only where the whole graph is compiled: the allocator times them all at once through
    the backend's compiled call (two builds), keeps or undoes them as one, and never times them alone."""
    import time

    prog, ev = _setup(0.5)
    acts = [_action("a", "_0", 0.999, gain=3.0), _action("b", "_2", 0.999, gain=1.0)]
    for a in acts:
        a.compiled_gain = True
    built = []

    def compiled(program):
        applied = sum(n.target is torch.nn.functional.linear for n in program.gm.graph.nodes)
        built.append(applied)
        seconds = 0.004 - 0.0015 * applied if faster else 0.001 + 0.0015 * applied
        return lambda: time.sleep(seconds)

    alloc = allocate(prog, acts, ev, 0.5, measure=True, measure_s=0.3, compiled=compiled)
    assert built == [0, 2], "one build without them and one with both, nothing else"
    if faster:
        assert alloc.kept == acts and all(a.status == "kept" for a in acts)
        gains = [a.measured_gain_s for a in acts]
        assert gains[0] == pytest.approx(3 * gains[1]) and sum(gains) == pytest.approx(0.003, rel=0.3)
    else:
        assert alloc.kept == [] and alloc.program is prog
        assert all(a.status == "not faster here (measured together, compiled)" for a in acts)
    assert any("measured together with the whole graph compiled" in n for n in alloc.notes)


# -- the pipeline and optimize -----------------------------------------------------------------------
def test_lossy_passes_need_a_budget():
    m = classifier()
    x = torch.randn(20, 16)
    fast = optic.optimize(m, (x,), target="a100", passes=["sparse24"])
    assert fast.report.pass_record("sparse24").skipped.startswith("lossy")
    zero = optic.optimize(m, (x,), target="a100", passes=["sparse24"], budget=optic.Budget(max_drop=0),
                          calibration=labeled_batches(m))
    assert zero.report.pass_record("sparse24").skipped == "lossy: the budget is 0"
    assert torch.equal(zero(x), m(x))


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(1024, 4096)
        self.down = nn.Linear(4096, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_sparse24_spends_the_budget_on_a_sparse_target_and_declines_on_the_cpu():
    m = Wide().eval()
    x = torch.randn(512, 1024)
    data = [(torch.randn(512, 1024),) for _ in range(3)]
    budget = optic.Budget(max_drop=0.5, metric="rel_error")
    fast = optic.optimize(m, (x,), target="h100", passes=["sparse24"], budget=budget, calibration=data)
    rows = fast.report.budget["actions"]
    kept = [r for r in rows if r["status"] == "kept"]
    assert kept and all(r["predicted_only"] for r in kept)
    assert fast.report.budget["final_holdout_drop"] <= 0.5
    w = fast.program.gm.get_buffer(next(n for n, _ in fast.program.gm.named_buffers() if "sparse24_w" in n))
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert "pred." in fast.report.table()
    on_cpu = optic.optimize(m, (x,), target="cpu", passes=["sparse24"], budget=budget, calibration=data,
                            measure=False)
    rec = on_cpu.report.pass_record("sparse24")
    assert not rec.changed and any("no sparse tensor cores" in n for n in rec.notes)


# -- 2:4 math -----------------------------------------------------------------------------------------
@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 2**16))
def test_mask_keeps_two_of_every_four(rows, groups, seed):
    w = torch.randn(rows, 4 * groups, generator=torch.Generator().manual_seed(seed))
    mask = mask_2_4(w)
    assert mask.reshape(rows, groups, 4).sum(-1).eq(2).all()
    # the kept ones are the largest in their group
    kept_min = torch.where(mask, w.abs(), torch.inf).reshape(rows, groups, 4).min(-1).values
    dropped_max = torch.where(~mask, w.abs(), -torch.inf).reshape(rows, groups, 4).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_wanda_importance_weights_columns_by_input_norm():
    w = torch.ones(1, 4)
    x = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    mask = mask_2_4(w, wanda_importance(w, [x]))
    assert mask.tolist() == [[False, False, True, True]]


def test_sparse_prediction_pays_only_when_compute_bound():
    a100 = optic.targets.get("a100")
    dense, sparse = predicted_seconds(4096, 4096, 4096, 2, a100)
    assert 1.2 < dense / sparse <= 2.0
    dense1, sparse1 = predicted_seconds(1, 4096, 4096, 2, a100)  # batch-1 GEMV: memory-bound
    assert sparse1 >= dense1


def test_sparse24_run_declines_layers_it_cannot_take():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.odd = nn.Linear(6, 8)  # input dim not a multiple of 4

        def forward(self, x):
            return self.odd(x)

    prog = capture(M().eval(), (torch.randn(4096, 6),))
    ctx = PassContext(target=optic.targets.get("a100"))
    assert get("sparse24").run(prog, ctx) is False
    assert any("multiple of 4" in why for _, _, why in ctx.stats.declined)


def test_greedy_allocation_against_the_exact_optimum_on_a_small_case():
    """HAWQ-V3 solves the allocation as an integer program; optic's greedy gain-per-drop allocator is held
    against that program's exact optimum (by enumeration) on a case where greedy is not trivially right:
    levels per group, a conflict, gains and drops that do not rank alike."""
    from optic.budget.allocator import optimum

    prog, ev = _setup(0.1)
    actions = [
        _action("a", "_2", 0.97, gain=3.0, level=1), _action("a", "_2", 0.93, gain=5.0, level=2),
        _action("b", "_0", 0.98, gain=2.0, level=1), _action("b", "_0", 0.95, gain=4.0, level=2),
        _action("c", "_2", 0.99, gain=1.0),  # conflicts with group a (same node)
    ]
    alloc = allocate(prog, actions, ev, 0.1)
    greedy = sum(a.predicted_gain_s for a in alloc.kept)
    best, chosen = optimum(actions, 0.1)
    assert sum(max(a.drop_alone, 0) for a in chosen) <= 0.1 + 1e-12
    assert best >= greedy > 0  # the optimum bounds greedy; greedy found a real allocation
    print(f"greedy gain {greedy} vs exact optimum {best} ({greedy / best:.0%})")
    assert greedy >= 0.75 * best
    assert alloc.holdout_drop <= 0.1


@pytest.mark.parametrize("faster", [True, False])
def test_actions_too_small_to_time_alone_are_measured_together_in_the_plain_graph(faster, monkeypatch):
    """bf16 layers on a CPU each save less than the model's timing noise: timed all at once (with all of them
    against none), in the plain graph even where the backend compiles (their gain needs no compile)."""
    from optic.budget import allocator

    prog, ev = _setup(0.5)
    acts = [_action("a", "_0", 0.999, gain=3.0), _action("b", "_2", 0.999, gain=1.0)]
    for a in acts:
        a.measured_together = True
    timed = []

    def fake_compare(fns, budget_s, settle_s=None):
        from optic.pipeline.timing import Timing

        timed.append(sorted(fns))

        with_ = 0.001 if faster else 0.003
        return {"without": Timing(0.002, 0.002, 0.002, 5), "with": Timing(with_, with_, with_, 5)}

    monkeypatch.setattr(allocator, "compare_models", fake_compare)
    never = lambda program: pytest.fail("the compiled call is for actions whose gain shows compiled")  # noqa: E731
    alloc = allocate(prog, acts, ev, 0.5, measure=True, measure_s=0.1, compiled=never)
    assert timed == [["with", "without"]], "one measurement for all of them, none alone"
    if faster:
        assert alloc.kept == acts and acts[0].measured_gain_s == pytest.approx(3 * acts[1].measured_gain_s)
    else:
        assert alloc.kept == [] and all(a.status == "not faster here (measured together, plain graph)" for a in acts)
    assert any("2 test actions measured together in the plain graph" in n for n in alloc.notes)


def test_a_layers_bf16_and_int8_actions_are_alternatives_bf16_the_milder():
    """precision and quantize share the layer's group: at most one applies, the stronger where the budget allows."""
    prog, ev = _setup(0.5)
    bf16 = _action("_2", "_2", 0.999, gain=1.0, level=0.5)
    bf16.pass_name = "precision"
    int8 = _action("_2", "_2", 0.99, gain=2.0, level=1.0)
    int8.pass_name = "quantize"
    alloc = allocate(prog, [int8, bf16], ev, 0.5)
    assert alloc.kept == [int8] and bf16.status == "superseded"
    alloc = allocate(prog, [int8, bf16], ev, 0.005)  # int8's drop (0.01) is over this budget, bf16's is not
    assert alloc.kept == [bf16] and int8.status.startswith("over budget")
