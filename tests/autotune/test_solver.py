"""The solver: exactly the brute-force set on random small spaces, never an invalid configuration,
and propagation instead of a filtered product on the realistic A100 GEMM space."""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import sympy
from hypothesis import given
from hypothesis import strategies as st
from sympy import Eq, Ge, Gt, Le, Lt, Mod, Ne, Or, ceiling

from optic import autotune
from optic.autotune import Constraint, Space, Var, brute_force, solve, symbols
from optic.autotune import solver as solver_module

NAMES = ("A", "B", "C", "D")
P = sympy.Symbol("P")


def _reference(space: Space) -> list[tuple[int, ...]]:
    """Brute force with sympy's exact evaluation: independent of the compiled constraints."""
    product = itertools.product(*(v.domain for v in space.variables))
    return sorted(cfg for cfg in product if not space.check(dict(zip(space.names, cfg, strict=True))))


@st.composite
def small_spaces(draw) -> Space:
    """Up to four variables with small domains, a parameter, and constraints of the kinds the templates
    use (divisibility, capacity products, equal products, sums, quotients) and a few others
    (ceiling, Or, Ne, strict and flipped inequalities, denominators that may be zero), which the
    solver evaluates exactly too."""
    n = draw(st.integers(1, 4))
    syms = symbols(" ".join(NAMES[:n]) + " _")[:n]
    variables = [Var(NAMES[i], draw(st.sets(st.integers(1, 16), min_size=1, max_size=4))) for i in range(n)]
    var = st.sampled_from(syms)
    small = st.integers(1, 8)
    kinds = [
        st.builds(lambda a, b: Eq(Mod(a, b), 0), var, var),
        st.builds(lambda a, b, k: Eq(Mod(P * k, a * b), 0), var, var, small),
        st.builds(lambda a, b, c, k: Eq(Mod(a * b, c * k), 0), var, var, var, st.integers(1, 3)),
        st.builds(lambda a, b, c, k: Le(a * b * c, P * k), var, var, var, small),
        st.builds(lambda a, b, k: Le(a * b, k * 16), var, var, small),
        st.builds(lambda a, b, c, k: Eq(a * b, c * k), var, var, var, st.integers(1, 4)),
        st.builds(lambda a, b, c, k: Eq((a / b) * c, k), var, var, var, small),
        st.builds(lambda a, b, k: Le(a + 2 * b, k * 4), var, var, small),
        st.builds(lambda a, b, c, k: Ge(a * b / c, k), var, var, var, small),
        st.builds(lambda a, b, c, k: Lt(a / b + c, k * 3), var, var, var, small),
        st.builds(lambda a, b, c, k: Gt(a * a - b * c, k - 4), var, var, var, small),
        st.builds(lambda a, b, k: Le(ceiling(P / a) * b, k * 8), var, var, small),
        st.builds(lambda a, b: Or(Eq(Mod(a, b), 0), Eq(Mod(b, a), 0)), var, var),
        st.builds(lambda a, b: Ne(a, b), var, var),
        # Denominators that can be zero: undefined, so the configuration is invalid.
        st.builds(lambda a, b, c, k: Ne(a / (b - c), k) if b != c else Ne(a, k), var, var, var, small),
        st.builds(lambda a, b, c, k: Le(Mod(a, b - c), k) if b != c else Le(a, k), var, var, var, small),
    ]
    constraints = draw(st.lists(st.one_of(kinds), max_size=4))
    return Space("random", variables, constraints, params={"P": draw(st.integers(1, 64))})


@given(small_spaces())
def test_solver_yields_exactly_the_brute_force_set(space):
    expected = _reference(space)
    solved = solve(space)
    assert sorted(solved.rows) == expected
    assert len(set(solved.rows)) == len(solved.rows) == solved.valid
    assert sorted(brute_force(space).rows) == expected
    for cfg in solved.configs:
        assert space.check(cfg) == []


@st.composite
def large_valued_spaces(draw) -> Space:
    """Three variables whose values reach past int64 (2**70) or make products that do (2**40), with the
    polynomial and divisibility constraints the search evaluates in numpy: each check must fall back
    to Python integers exactly when int64 could overflow, and pair tables must work by domain index."""
    values = st.one_of(st.integers(1, 16), st.integers(1, 1 << 40), st.integers(1, 1 << 70))
    variables = [Var(n, draw(st.sets(values, min_size=1, max_size=4))) for n in NAMES[:3]]
    A, B, C = symbols("A B C")
    bound = st.integers(1, 1 << 120)
    kinds = [
        st.builds(lambda k: Le(A * B * C, k), bound),
        st.builds(lambda k: Ge(A * B - C, k - (1 << 80)), bound),
        st.just(Eq(Mod(A * B, C), 0)),
        st.just(Eq(Mod(C, A), 0)),
        st.builds(lambda k: Lt(A + B, k), bound),
        st.just(Ne(A * C, B)),
    ]
    return Space("large", variables, draw(st.lists(st.one_of(kinds), max_size=3)))


@given(large_valued_spaces())
def test_exact_beyond_int64(space):
    expected = sorted(brute_force(space).rows)
    assert sorted(solve(space).rows) == expected
    assert expected == _reference(space)


@given(small_spaces(), st.integers(1, 40))
def test_chunked_search_finds_the_same_rows_in_the_same_order(space, cells):
    # A frontier of more than _CELLS candidates is searched in chunks, depth first.
    whole = solve(space)
    with mock.patch.object(solver_module, "_CELLS", cells):
        chunked = solve(space)
        first = solve(space, limit=3)
    assert chunked.rows == whole.rows
    assert first.rows == whole.rows[:3]


def test_checks_numpy_cannot_evaluate_fall_back_to_exact_functions():
    # A three-variable Or: a truth table over small domains, a call per candidate when the table would be
    # larger than the candidates (40**3 values, a few dozen candidates).
    X, Y, Z = symbols("X Y Z")
    relation = Or(Eq(Mod(X + Y, Z), 0), Le(X * Y, Z))
    for size in (4, 40):
        space = Space("or", [Var(n, range(1, size + 1)) for n in "XYZ"], [Eq(X, Y), relation])
        assert sorted(solve(space).rows) == sorted(brute_force(space).rows)
        assert len(solve(space).rows) > size


def test_int64_only_when_no_intermediate_can_overflow():
    small, large = {"X": 1, "Y": 1}, {"X": 1 << 40, "Y": 1 << 40}
    assert solver_module._vectorized("X*Y*Y <= 5", ("X", "Y"), small, small).int64
    assert not solver_module._vectorized("X*Y*Y <= 5", ("X", "Y"), small, large).int64
    assert solver_module._vectorized("(X) % (Y + 1) == 0", ("X", "Y"), small, small).int64
    assert solver_module._vectorized("(X) % (Y - 1) == 0", ("X", "Y"), small, large) is None  # Y - 1 may be 0
    assert solver_module._vectorized("X < 1 or Y < 2", ("X", "Y"), small, large) is None  # `or` is not elementwise


def test_result_is_an_array_and_rows_are_tuples_of_ints():
    result = solve(autotune.matmul_gpu(4096, 4096, 4096, "a100"))
    assert result.found.dtype == np.int16 and result.found.shape == (result.valid, 9)  # values up to 256
    assert result.array.dtype == np.int64
    assert type(result.rows[0]) is tuple and all(type(x) is int for x in result.rows[0])
    assert brute_force(Space("free", [Var("X", (1, 1 << 70))])).array.tolist() == [[1], [1 << 70]]


@given(small_spaces(), st.integers(0, 4))
def test_limit_stops_early_with_valid_configs(space, limit):
    everything = set(solve(space).rows)
    first = solve(space, limit=limit)
    assert set(first.rows) <= everything
    assert first.valid == min(limit, len(everything))
    if len(everything) > limit:
        assert not first.complete


def test_reduced_a100_gemm_space_matches_brute_force():
    space = autotune.matmul_gpu(4096, 4096, 4096, "a100").restrict(
        BM=(32, 64, 128, 256), BN=(64, 128, 256), WM=(16, 32, 64), WN=(16, 32, 64), TM=(2, 4, 8), TN=(4, 8),
        STAGES=(2, 3, 4), VEC=(4, 8))
    solved, brute = solve(space), brute_force(space)
    assert solved.valid > 100
    assert sorted(solved.rows) == sorted(brute.rows)
    sample = solved.configs[:: max(1, solved.valid // 20)]
    assert all(space.check(cfg) == [] for cfg in sample)


def test_realistic_a100_gemm_is_searched_not_filtered():
    space = autotune.matmul_gpu(4096, 4096, 4096, "a100")
    result = solve(space)
    assert result.space_size == space.size == 2_250_000
    assert result.valid > 10_000 and result.complete
    assert result.pruned_by_propagation > 0
    assert result.nodes < space.size // 50  # values tried, at every level, against the product
    assert result.domains["VEC"] == (1, 2, 4, 8)  # VEC*2 <= 16: removed before the search
    assert solve(space).rows == result.rows  # deterministic


def test_propagation_gives_divisor_domains():
    X, Y = symbols("X Y")
    space = Space("divisors", [Var("X", range(1, 101)), Var("Y", range(1, 101))],
                  [Eq(Mod(sympy.Symbol("N"), X), 0), Eq(Mod(X, Y), 0), Le(X * Y, 40)], params={"N": 24})
    result = solve(space)
    assert result.domains["X"] == (1, 2, 3, 4, 6, 8, 12, 24)
    assert result.domains["Y"] == (1, 2, 3, 4, 6, 8, 12, 24)  # divides some X; X*Y <= 40 for some X
    assert sorted(result.rows) == sorted(brute_force(space).rows)
    assert all(space.check(cfg) == [] for cfg in result.configs)
    assert result.pruned_by_propagation == space.size - 8 * 8


def test_exact_arithmetic_at_the_boundary():
    # 1/3 + 2/3 == 1 exactly: a float evaluation would get the equality wrong.
    A, B = symbols("A B")
    space = Space("thirds", [Var("A", (1, 2, 3)), Var("B", (3, 6))], [Eq(A / B + (B - A) / B, 1), Le(A / B, sympy.Rational(1, 3))])
    assert sorted(solve(space).rows) == _reference(space) == [(1, 3), (1, 6), (2, 6)]


def test_empty_and_trivial_spaces():
    X = symbols("X")[0]
    contradiction = Space("none", [Var("X", (1, 2, 4))], [Constraint(Ge(X, 8), "too big")])
    result = solve(contradiction)
    assert result.valid == 0 and result.complete and result.pruned_by_propagation == 3
    assert solve(Space("false", [Var("X", (1, 2))], [Le(sympy.Symbol("K"), 1)], params={"K": 2})).valid == 0
    assert solve(Space("free", [Var("X", (1, 2))])).rows == [(1,), (2,)]
    assert solve(Space("nothing", [])).rows == [()]


def test_configs_are_dicts_in_variable_order():
    result = solve(autotune.reduction_gpu(1024, 1024, "a100"))
    assert result.configs[0] == dict(zip(result.names, result.rows[0], strict=True))
    assert list(result.configs[0]) == ["TPR", "RPB", "VEC"]
    assert "valid" in result.summary()
