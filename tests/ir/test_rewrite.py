"""The rule driver (``optic.ir.rewrite``): fixed point, one rule per op per sweep, declines that name
their node and vanish when a later sweep overcomes them, the sweep bound, and ``find_sites`` (the same
walk, nothing rewritten).

The graphs are chains of unary ops (``neg``, ``tanh``, ``relu``, ``sigmoid``) on one input, written as
lists of their names; the rules swap one op for another or drop a ``tanh`` that reads a ``tanh``, so the
expected graph after the driver is known as a list too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis_profiles import examples

from optic.ir.opview import Op, view
from optic.ir.rewrite import MODEL, OPAQUE, Rule, RuleStats, Several, Site, apply_rules, find_sites

FNS = {"neg": torch.neg, "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}


def chain(names: list[str]) -> fx.GraphModule:
    """``names[-1](... names[0](x))`` as a graph module; fx names the nodes ``relu``, ``relu_1``, ..."""
    g = fx.Graph()
    v = g.placeholder("x")
    for name in names:
        v = g.call_function(FNS[name], (v,))
    g.output(v)
    return fx.GraphModule(nn.Module(), g)


def fn_of(op: Op | None) -> str | None:
    """The op view's name for a chain link: ``neg``, or an activation's function."""
    if op is None:
        return None
    return op.attrs.get("fn") if op.kind == "act" else op.kind


def ops_of(gm: fx.GraphModule) -> list[str]:
    return [fn_of(view(n, gm)) for n in gm.graph.nodes if n.op == "call_function"]


def run_chain(names: list[str], x: torch.Tensor) -> torch.Tensor:
    for name in names:
        x = FNS[name](x)
    return x


@dataclass
class Swap(Rule):
    """``src(x)`` becomes ``dst(x)``."""

    src: str = ""
    dst: str = ""

    def match(self, op: Op, ctx) -> Op | None:
        return op if fn_of(op) == self.src else None

    def apply(self, op: Op, ctx) -> None:
        graph = op.node.graph
        with graph.inserting_before(op.node):
            new = graph.call_function(FNS[self.dst], (op.x,))
        op.node.replace_all_uses_with(new)


@dataclass
class DropInnerTanh(Rule):
    """``tanh(tanh(x))`` becomes ``tanh(x)`` (a pattern over two ops: the outer one is matched)."""

    def match(self, op: Op, ctx) -> Op | None:
        if fn_of(op) != "tanh" or not isinstance(op.x, fx.Node):
            return None
        return op if fn_of(view(op.x, op.node.graph.owning_module)) == "tanh" else None

    def apply(self, op: Op, ctx) -> None:
        op.node.replace_all_uses_with(op.x)


@dataclass
class ReluBeforeTanh(Rule):
    """``relu`` becomes ``sigmoid``, legal only where its one reader is a ``tanh``."""

    def match(self, op: Op, ctx) -> Op | None:
        return op if fn_of(op) == "relu" else None

    def guard(self, op: Op, ctx) -> str | None:
        users = list(op.node.users)
        gm = op.node.graph.owning_module
        return None if len(users) == 1 and fn_of(view(users[0], gm)) == "tanh" else "its reader is not a tanh"

    def apply(self, op: Op, ctx) -> None:
        Swap(self.name, src="relu", dst="sigmoid").apply(op, ctx)


NEG_TO_TANH = Swap("neg_to_tanh", src="neg", dst="tanh")


def _after_rules(names: list[str]) -> tuple[list[str], int, int]:
    """What neg_to_tanh then drop_inner_tanh leave of a chain, and how often each fires: every neg becomes a
    tanh, and a run of L tanh collapses to one (L - 1 drops)."""
    out, drops = [], 0
    for name in ("tanh" if n == "neg" else n for n in names):
        if name == "tanh" and out and out[-1] == "tanh":
            drops += 1
        else:
            out.append(name)
    return out, names.count("neg"), drops


# -- apply_rules ----------------------------------------------------------------------------------------


@examples(30)
@given(st.lists(st.sampled_from(["neg", "tanh", "relu"]), min_size=1, max_size=8))
@example(["neg", "neg", "tanh", "relu", "tanh", "neg"])
@example(["tanh", "neg"])  # the neg becomes a tanh after the tanh it reads was visited: a second sweep drops it
def test_rules_run_to_a_fixed_point_with_exact_counts(names):
    gm, stats = chain(names), RuleStats()
    rules = [NEG_TO_TANH, DropInnerTanh("drop_inner_tanh")]
    expected, swaps, drops = _after_rules(names)
    x = torch.linspace(-2, 2, 9)
    changed = apply_rules(gm, rules, None, stats)
    assert changed == bool(swaps or drops)
    assert ops_of(gm) == expected  # dead code removed: the replaced ops are gone
    assert stats.matched == {k: v for k, v in (("neg_to_tanh", swaps), ("drop_inner_tanh", drops)) if v}
    assert not stats.declined
    torch.testing.assert_close(gm(x), run_chain(expected, x))  # recompiled: the module runs the new graph
    assert find_sites(gm, rules, None, RuleStats()) == []  # nothing left to fire: a fixed point


def test_nothing_to_match_changes_nothing():
    gm, stats = chain(["relu", "tanh"]), RuleStats()
    code = gm.code
    assert apply_rules(gm, [NEG_TO_TANH], None, stats) is False
    assert gm.code == code and stats.matched == {} and not stats.declined


def test_per_op_and_sweep_the_first_rule_in_the_list_that_applies_wins():
    to_tanh, to_sigmoid = Swap("to_tanh", src="relu", dst="tanh"), Swap("to_sigmoid", src="relu", dst="sigmoid")
    for rules, wins, result in (([to_tanh, to_sigmoid], "to_tanh", "tanh"),
                                ([to_sigmoid, to_tanh], "to_sigmoid", "sigmoid")):
        gm, stats = chain(["relu", "neg", "relu"]), RuleStats()
        apply_rules(gm, rules, None, stats)
        assert stats.matched == {wins: 2}
        assert ops_of(gm) == [result, "neg", result]


def test_an_op_a_rule_creates_is_visited_in_the_next_sweep_and_the_sweeps_are_bounded():
    """A rule that always finds work again (relu -> a new relu) fires once per op per sweep, and the
    driver stops after ``max_sweeps``."""
    for sweeps in (1, 3, 7):
        gm, stats = chain(["relu", "neg", "relu"]), RuleStats()
        assert apply_rules(gm, [Swap("again", src="relu", dst="relu")], None, stats, max_sweeps=sweeps)
        assert stats.matched == {"again": 2 * sweeps}
        assert ops_of(gm) == ["relu", "neg", "relu"]  # each sweep's replaced relus were removed


def test_a_decline_names_its_node_and_one_a_later_sweep_overcame_is_not_reported():
    """``relu`` (read by a neg) declines in the first sweep, in which the neg becomes a tanh; the second
    sweep rewrites it. ``relu_1`` (read by the output) declines for good, and only it is reported."""
    gm, stats = chain(["relu", "neg", "relu"]), RuleStats()
    assert apply_rules(gm, [ReluBeforeTanh("relu_before_tanh"), NEG_TO_TANH], None, stats)
    assert ops_of(gm) == ["sigmoid", "tanh", "relu"]
    assert stats.matched == {"relu_before_tanh": 1, "neg_to_tanh": 1}
    assert list(stats.declined) == [("relu_before_tanh", "relu_1", "its reader is not a tanh")]


def test_without_the_rule_that_would_overcome_it_every_decline_is_reported_in_graph_order():
    gm, stats = chain(["relu", "neg", "relu"]), RuleStats()
    assert apply_rules(gm, [ReluBeforeTanh("relu_before_tanh")], None, stats) is False
    assert list(stats.declined) == [("relu_before_tanh", "relu", "its reader is not a tanh"),
                                    ("relu_before_tanh", "relu_1", "its reader is not a tanh")]


# -- find_sites ---------------------------------------------------------------------------------------------


@dataclass
class NotTanh(Site):
    """Activations other than tanh."""

    def guard(self, op: Op, ctx) -> str | None:
        return "a tanh" if op.attrs.get("fn") == "tanh" else None


def test_find_sites_returns_the_sites_in_graph_order_and_leaves_the_graph_alone():
    gm = chain(["relu", "neg", "tanh", "sigmoid", "relu"])
    code, nodes = gm.code, [n.name for n in gm.graph.nodes]
    stats = RuleStats()
    sites = find_sites(gm, NotTanh("acts", kinds=frozenset({"act"})), None, stats)
    assert [s.node.name for s in sites] == ["relu", "sigmoid", "relu_1"]
    assert all(isinstance(s, Op) for s in sites)  # a Site's match is the op itself
    assert gm.code == code and [n.name for n in gm.graph.nodes] == nodes
    assert list(stats.declined) == [("acts", "tanh", "a tanh")]
    assert stats.matched == {}  # a site counts as a match only when the pass acts on it


def test_find_sites_takes_the_first_rule_that_accepts_an_op_and_any_kind_without_kinds():
    gm = chain(["neg", "tanh", "relu"])
    stats = RuleStats()
    first, anything = NotTanh("not_tanh", kinds=frozenset({"act"})), Site("anything")
    sites = find_sites(gm, [first, anything], None, stats)
    assert [s.node.name for s in sites] == ["neg", "tanh", "relu"]  # tanh: declined by the first, taken by the second
    assert list(stats.declined) == [("not_tanh", "tanh", "a tanh")]


def test_a_site_is_found_never_applied():
    with pytest.raises(TypeError, match="find_sites"):
        Site("somewhere").apply(None, None)


def test_the_model_wide_node_name_cannot_be_a_node_of_a_graph():
    """fx names nodes with identifiers; a decline about the whole model names MODEL, which none can be."""
    assert not MODEL.isidentifier()


@dataclass
class Pieces(Site):
    """Two sites per activation (its halves); the second half of a tanh is refused."""

    def match(self, op, ctx):
        return Several([(op.node.name, 0), (op.node.name, 1)]) if op.kind == "act" else None

    def guard(self, piece, ctx):
        return "the second half of a tanh" if piece[1] == 1 and "tanh" in piece[0] else None


def test_an_op_that_is_the_place_of_several_sites_gives_each_guarded_in_order():
    gm = chain(["relu", "tanh", "neg", "sigmoid"])
    stats = RuleStats()
    assert find_sites(gm, Pieces("halves"), None, stats) == [("relu", 0), ("relu", 1), ("tanh", 0),
                                                              ("sigmoid", 0), ("sigmoid", 1)]
    assert list(stats.declined) == [("halves", "tanh", "the second half of a tanh")]


@dataclass
class Asserts(Rule):
    """Erases the calls it names: torch.ops.aten._assert_tensor_metadata, which the op view does not classify."""

    def match(self, op, ctx):
        return op if op.kind == OPAQUE else None

    def apply(self, op, ctx):
        op.node.graph.erase_node(op.node)


def test_a_rule_sees_the_calls_the_op_view_does_not_classify_only_when_it_names_them():
    g = fx.Graph()
    x = g.placeholder("x")
    check = g.call_function(torch.ops.aten._assert_tensor_metadata.default, (x,), {"dtype": torch.float32})
    y = g.call_function(torch.relu, (x,))
    g.output(y)
    gm = fx.GraphModule(nn.Module(), g)
    assert view(check, gm) is None
    stats = RuleStats()
    assert not apply_rules(gm, [Asserts("blind")], None, stats)  # not named: never shown
    assert apply_rules(gm, [Asserts("asserts", targets=frozenset({torch.ops.aten._assert_tensor_metadata.default}))],
                       None, stats)
    assert stats.matched == {"asserts": 1}
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.relu]
