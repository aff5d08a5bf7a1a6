"""Enumerate every configuration of a Space that satisfies all its constraints, without building the product.

``solve`` is propagation plus backtracking:

1. The parameters are substituted and each constraint is compiled once to a
   plain Python function over integers. A polynomial relation in the variables
   (negative powers allowed, e.g. ``BM*BN/(TM*TN) <= MAX_THREADS``) has its
   denominators cleared (they are monomials in positive variables, so the
   sign is kept) and divisibility ``Mod(a, b) == 0`` becomes ``P % Q == 0`` over
   integers; anything else (``ceiling``, ``Or`` of non-polynomial parts, ...)
   is evaluated with ``fractions.Fraction``. Sympy is never called while searching.
2. Propagation before the search: constraints over one variable filter its
   domain; constraints over two are made arc consistent (a value stays only if
   some value of the other variable supports it: divisor and multiple domains
   fall out of this); polynomial constraints over more variables remove values
   that fail even when every other variable takes its most favourable bound
   (capacity: ``STAGES*(BM*BK + BK*BN)*BYTES <= SMEM`` bounds BM by the smallest
   BK, BN and STAGES). Repeated until nothing changes.
3. Search: variables most constrained first; a value of the next variable
   comes only from the values its already-assigned two-variable partners
   allow; a constraint is evaluated as soon as all its variables are assigned,
   and a polynomial one earlier as an interval bound (the unassigned variables
   at their most favourable domain ends). Domains ascend, so a bound that can
   only grow with the new variable ends that variable's loop at its first failure.

``brute_force`` filters the full product with the same compiled constraints, so
comparing the two measures search, not constraint evaluation. ``Space.check``
(sympy, exact) is the independent reference the tests hold both to.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import sympy
from sympy.printing.pycode import PythonCodePrinter

from .space import Space

__all__ = ["SolveResult", "brute_force", "solve"]

Mono = tuple[tuple[str, int], ...]  # (variable, nonzero exponent), sorted by name


@dataclass(frozen=True)
class SolveResult:
    """Every valid configuration of a space (or the first ``limit``), with what it took to find them.

    ``rows`` are the configurations as tuples in the order of ``names`` (the space's variables), in
    the order the enumeration found them: deterministic for a given space, but the solver's order
    differs from brute force's, so compare them sorted. ``configs`` are the same as dicts, built
    on first use (building tens of thousands of dicts costs more than finding them).
    ``pruned_by_propagation`` is how many configurations of the product propagation removed before
    the search (``space_size`` minus the product of the propagated domain sizes); ``nodes`` counts
    the values the search tried, at every level.
    """

    names: tuple[str, ...]
    rows: list[tuple[int, ...]]
    space_size: int
    valid: int
    seconds: float
    pruned_by_propagation: int
    nodes: int = 0
    complete: bool = True  # False when ``limit`` stopped the enumeration early
    order: tuple[str, ...] = ()  # the variable order the search used, outermost first
    domains: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # after propagation

    @functools.cached_property
    def configs(self) -> list[dict[str, int]]:
        names = self.names
        return [dict(zip(names, row)) for row in self.rows]  # noqa: B905 - rows have len(names)

    def summary(self) -> str:
        more = "" if self.complete else " (stopped at the limit)"
        return (f"{self.space_size:,} configurations, {self.valid:,} valid{more}, "
                f"{self.seconds * 1e3:.1f} ms, {self.pruned_by_propagation:,} removed by propagation, "
                f"{self.nodes:,} search nodes")


# -- polynomials with integer exponents over positive variables -------------------------------------


class _Laurent:
    """A sum of rational coefficients times monomials with integer (possibly negative) exponents."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[Mono, Fraction]):
        self.terms = {m: c for m, c in terms.items() if c}

    @staticmethod
    def of(expr: Any, names: frozenset[str]) -> _Laurent | None:
        """``expr`` as a Laurent polynomial in the variables ``names``; None if it is not one."""
        terms: dict[Mono, Fraction] = {}
        for term in sympy.Add.make_args(sympy.expand(expr)):
            coeff, rest = term.as_coeff_Mul()
            if not coeff.is_Rational:
                return None
            mono: dict[str, int] = {}
            for base, exp in rest.as_powers_dict().items():
                if base == 1:
                    continue
                if not (base.is_Symbol and base.name in names and exp.is_Integer):
                    return None
                mono[base.name] = mono.get(base.name, 0) + int(exp)
            key = tuple(sorted((v, e) for v, e in mono.items() if e))
            terms[key] = terms.get(key, Fraction(0)) + Fraction(int(coeff.p), int(coeff.q))
        return _Laurent(terms)

    def __neg__(self) -> _Laurent:
        return _Laurent({m: -c for m, c in self.terms.items()})

    @property
    def names(self) -> set[str]:
        return {v for m in self.terms for v, _ in m}

    def lower_bound(self, keep: set[str], lo: Mapping[str, int], hi: Mapping[str, int]) -> _Laurent:
        """The least value over the box ``lo..hi`` of the variables not in ``keep``, as a
        polynomial in ``keep``: each term independently at its minimising corner (sound
        because every variable is positive, so each monomial is monotone in each variable)."""
        terms: dict[Mono, Fraction] = {}
        for mono, c in self.terms.items():
            factor, kept = Fraction(c), []
            for v, e in mono:
                if v in keep:
                    kept.append((v, e))
                else:  # c * v**e smallest: small v**e when c > 0, large when c < 0
                    factor *= Fraction(lo[v] if (c > 0) == (e > 0) else hi[v]) ** e
            key = tuple(kept)
            terms[key] = terms.get(key, Fraction(0)) + factor
        return _Laurent(terms)

    def nondecreasing_in(self, v: str) -> bool:
        """True if the value can only grow with ``v`` (every term with ``v`` has coefficient and exponent of one sign)."""
        return all(c * e > 0 for m, c in self.terms.items() for u, e in m if u == v)

    def cleared(self) -> tuple[_Laurent, _Laurent]:
        """(numerator, denominator), integer polynomials with ``self == numerator / denominator`` and a
        denominator that is a positive integer times a monomial: positive, so signs are kept."""
        shift: dict[str, int] = {}
        for m in self.terms:
            for v, e in m:
                if e < 0:
                    shift[v] = max(shift.get(v, 0), -e)
        scale = math.lcm(*(c.denominator for c in self.terms.values())) if self.terms else 1
        num: dict[Mono, Fraction] = {}
        for m, c in self.terms.items():
            exps = dict(m)
            for v, k in shift.items():
                exps[v] = exps.get(v, 0) + k
            num[tuple(sorted((v, e) for v, e in exps.items() if e))] = c * scale
        den = {tuple(sorted(shift.items())): Fraction(scale)}
        return _Laurent(num), _Laurent(den)

    def quotient(self, other: _Laurent) -> _Laurent | None:
        """``self / other`` when ``other`` is a single nonzero term; None otherwise."""
        if len(other.terms) != 1:
            return None
        ((mono, c),) = other.terms.items()
        terms: dict[Mono, Fraction] = {}
        for m, d in self.terms.items():
            exps = dict(m)
            for v, e in mono:
                exps[v] = exps.get(v, 0) - e
            key = tuple(sorted((v, e) for v, e in exps.items() if e))
            terms[key] = terms.get(key, Fraction(0)) + d / c
        return _Laurent(terms)

    def code(self) -> str:
        """Python source for an integer polynomial (``cleared()`` output)."""
        parts = []
        for m, c in sorted(self.terms.items()):
            assert c.denominator == 1 and all(e > 0 for _, e in m), "code() wants a cleared polynomial"
            factors = [v if e == 1 else f"{v}**{e}" for v, e in m]
            if not factors:
                parts.append(str(c.numerator))
            elif c == 1:
                parts.append("*".join(factors))
            else:
                parts.append("*".join([str(c.numerator), *factors]))
        return "(" + " + ".join(parts) + ")" if parts else "0"


# -- compiling constraints ---------------------------------------------------------------------------

_OPS = {sympy.Le: "<=", sympy.Lt: "<", sympy.Eq: "==", sympy.Ne: "!="}
_FLIPPED = {sympy.Ge: "<=", sympy.Gt: "<"}  # a >= b  <=>  b - a <= 0
_GLOBALS = {"__builtins__": {"min": min, "max": max, "abs": abs, "len": len}, "math": math, "Fraction": Fraction}


def _function(args: Sequence[str], body: str) -> Callable[..., bool]:
    return eval(f"lambda {', '.join(args)}: {body}", dict(_GLOBALS))  # noqa: S307 - source built here


class _FractionPrinter(PythonCodePrinter):
    """Python code in which rational constants stay exact."""

    def _print_Rational(self, expr: Any) -> str:
        return f"Fraction({expr.p}, {expr.q})"

    _print_Half = _print_Rational


def _as_relation(rel: Any, names: frozenset[str]) -> tuple[str, _Laurent] | None:
    """(op, g) with ``rel <=> g op 0`` and g a Laurent polynomial, or None."""
    if type(rel) in _OPS:
        op, g = _OPS[type(rel)], _Laurent.of(rel.lhs - rel.rhs, names)
    elif type(rel) in _FLIPPED:
        op, g = _FLIPPED[type(rel)], _Laurent.of(rel.rhs - rel.lhs, names)
    else:
        return None
    return None if g is None else (op, g)


def _as_divisibility(rel: Any, names: frozenset[str]) -> tuple[str, _Laurent, _Laurent] | None:
    """``Eq(c*Mod(a, b), 0)`` (or Ne) with b one term: (op, numerator, denominator) of a/b, cleared.

    ``c`` may hold positive variables: sympy writes ``Mod(x*y, x*z)`` as ``x*Mod(y, z)``."""
    if type(rel) not in (sympy.Eq, sympy.Ne):
        return None
    coeff, rest = (rel.lhs - rel.rhs).as_coeff_Mul()
    mods = [f for f in sympy.Mul.make_args(rest) if isinstance(f, sympy.Mod)]
    others = [f for f in sympy.Mul.make_args(rest) if not isinstance(f, sympy.Mod)]
    positive = all(f.is_Symbol and f.name in names or f.is_Pow and f.base.is_Symbol and f.base.name in names
                   for f in others)
    if coeff == 0 or len(mods) != 1 or not positive:
        return None
    (mod,) = mods
    a, b = (_Laurent.of(arg, names) for arg in mod.args)
    ratio = a.quotient(b) if a is not None and b is not None else None
    if ratio is None:
        return None
    num, den = ratio.cleared()
    return _OPS[type(rel)], num, den


def _analyse(rel: Any, names: frozenset[str]) -> tuple[str | None, tuple[str, _Laurent] | None]:
    """Integer-only Python source for ``rel`` (None if it needs exact rationals), and (op, g) with
    ``rel <=> g op 0`` if it is a polynomial relation (None otherwise)."""
    if rel is sympy.true or rel is sympy.false:
        return str(bool(rel)), None
    if isinstance(rel, sympy.And | sympy.Or):
        parts = [_analyse(arg, names)[0] for arg in rel.args]
        joiner = " and " if isinstance(rel, sympy.And) else " or "
        return (None if None in parts else "(" + joiner.join(parts) + ")"), None
    if isinstance(rel, sympy.Not):
        inner = _analyse(rel.args[0], names)[0]
        return (None if inner is None else f"(not {inner})"), None
    div = _as_divisibility(rel, names)
    if div is not None:
        op, num, den = div
        return f"{num.code()} % {den.code()} {op} 0", None
    poly = _as_relation(rel, names)
    if poly is not None:
        op, g = poly
        return f"{g.cleared()[0].code()} {op} 0", poly
    return None, None


class _Constraint:
    """One constraint with the parameters substituted, compiled for the solver."""

    def __init__(self, relation: Any, space: Space):
        free = {s.name for s in relation.free_symbols}
        self.relation = relation
        self.names = tuple(n for n in space.names if n in free)
        self.constant = bool(relation) if not self.names else None
        self.code, poly = _analyse(relation, frozenset(space.names))
        # Bounding forms h (h <= 0, or h < 0 when strict) whose conjunction is the constraint.
        self.forms: list[tuple[_Laurent, bool]] = []
        if poly is not None:
            op, g = poly
            self.forms = {"<=": [(g, False)], "<": [(g, True)], "==": [(g, False), (-g, False)]}.get(op, [])

    def exact(self, args: Sequence[str], space: Space) -> Callable[..., bool]:
        """The constraint as a function of ``args`` (which include all its variables), exact."""
        if self.code is not None:
            return _function(args, self.code)
        fn = sympy.lambdify([space.symbols[a] for a in args], self.relation,
                            modules=[{"Fraction": Fraction, "math": math}, "math"], printer=_FractionPrinter)

        def exact_rational(*values: int) -> bool:
            try:
                return bool(fn(*map(Fraction, values)))
            except ZeroDivisionError:  # sympy makes that nan/zoo, which satisfies no relation
                return False

        return exact_rational

    def bound_checks(self, keep: set[str], new: str, lo: Mapping[str, int],
                     hi: Mapping[str, int]) -> list[tuple[str, bool]]:
        """Necessary conditions over the assigned variables ``keep`` as Python source (exact when
        ``keep`` holds them all), each with whether its failure at ``new``'s value also fails every
        larger value of ``new``."""
        checks = []
        for h, strict in self.forms:
            bound = h.lower_bound(keep, lo, hi)
            num = bound.cleared()[0]
            checks.append((f"{num.code()} {'<' if strict else '<='} 0", bound.nondecreasing_in(new)))
        return checks


def _compile(space: Space) -> list[_Constraint]:
    return [_Constraint(space.bound(c.relation), space) for c in space.constraints]


# -- propagation ---------------------------------------------------------------------------------------

Pairs = dict[int, set[tuple[int, int]]]  # constraint index -> allowed (value of names[0], value of names[1])


def _propagate(space: Space, cons: list[_Constraint], domains: dict[str, list[int]]) -> Pairs | None:
    """Shrink ``domains`` in place to a fixpoint. Returns the allowed value pairs of every two-variable
    constraint (for the search's candidate tables), or None if some domain became empty."""
    for c in cons:
        if len(c.names) == 1:
            (v,) = c.names
            ok = c.exact(c.names, space)
            domains[v] = [x for x in domains[v] if ok(x)]
    if not all(domains.values()):
        return None
    pairs: Pairs = {}
    for k, c in enumerate(cons):
        if len(c.names) == 2:
            a, b = c.names
            ok = c.exact(c.names, space)
            pairs[k] = {(x, y) for x in domains[a] for y in domains[b] if ok(x, y)}
    capacity = [c for c in cons if len(c.names) > 2 and c.forms]
    changed = True
    while changed:
        changed = False
        for k, allowed in pairs.items():
            a, b = cons[k].names
            da, db = set(domains[a]), set(domains[b])
            keep = {a: {x for x, y in allowed if y in db}, b: {y for x, y in allowed if x in da}}
            for v in (a, b):
                new = [x for x in domains[v] if x in keep[v]]
                if len(new) != len(domains[v]):
                    domains[v], changed = new, True
        if not all(domains.values()):
            return None
        lo = {v: d[0] for v, d in domains.items()}
        hi = {v: d[-1] for v, d in domains.items()}
        for c in capacity:
            for v in c.names:
                checks = [_function([v], code) for code, _ in c.bound_checks({v}, v, lo, hi)]
                new = [x for x in domains[v] if all(ok(x) for ok in checks)]
                if len(new) != len(domains[v]):
                    if not new:
                        return None
                    domains[v], changed = new, True
                    lo[v], hi[v] = new[0], new[-1]
    return pairs


def _order(names: Sequence[str], domains: Mapping[str, list[int]], cons: list[_Constraint]) -> list[str]:
    """Greedy variable order: next the variable that completes the most constraints, then the one
    tied to the most assigned variables, then the most constrained, then the smallest domain."""
    multi = [set(c.names) for c in cons if len(c.names) > 1]
    degree = {n: sum(n in s for s in multi) for n in names}
    order: list[str] = []
    while len(order) < len(names):
        placed = set(order)

        def score(n: str, placed: set[str] = placed) -> tuple[int, int, int, int]:
            done = placed | {n}
            completes = sum(1 for s in multi if n in s and s <= done)
            touches = sum(1 for s in multi if n in s and s & placed)
            return completes, touches, degree[n], -len(domains[n])

        order.append(max((n for n in names if n not in placed), key=score))
    return order


# -- search --------------------------------------------------------------------------------------------


def solve(space: Space, limit: int | None = None) -> SolveResult:
    """Every configuration of ``space`` that satisfies all its constraints (the first ``limit`` found,
    if given), by propagation and backtracking; see the module docstring."""
    start = time.perf_counter()
    names = space.names
    cons = _compile(space)
    domains = {v.name: list(v.domain) for v in space.variables}
    pairs = None if any(c.constant is False for c in cons) else _propagate(space, cons, domains)
    order: Sequence[str] = names
    found: list[tuple[int, ...]] = []
    count = [0]
    complete = True
    if pairs is None:
        domains = {n: [] for n in names}
    elif not names:  # nothing to choose: the one empty configuration
        found.append(())
    elif limit is not None and limit <= 0:
        complete = False
    else:
        order = _order(names, domains, cons)
        source, namespace = _search_source(space, cons, pairs, order, domains, limit)
        namespace.update(_out=found, _count=count, _limit=limit)
        exec(compile(source, f"<solve {space.name}>", "exec"), namespace)  # noqa: S102 - source built here
        complete = namespace["_g0"]()
    kept = math.prod(len(d) for d in domains.values())
    return SolveResult(
        names=names, rows=found, space_size=space.size, valid=len(found), seconds=time.perf_counter() - start,
        pruned_by_propagation=space.size - kept, nodes=count[0], complete=complete, order=tuple(order),
        domains={n: tuple(d) for n, d in domains.items()})


_LEVELS_PER_FUNCTION = 12  # CPython allows 20 nested loops in one function
_FUSED_LEVELS = 5  # innermost levels enumerated by one list comprehension (when there is no limit)


def _search_source(space: Space, cons: list[_Constraint], pairs: Pairs, order: Sequence[str],
                   domains: Mapping[str, list[int]], limit: int | None) -> tuple[str, dict[str, Any]]:
    """Python source of the search: one loop per variable, nested in ``order``, each level's checks
    inline; and the namespace it runs in (domains, candidate tables, the Fraction-evaluated checks).

    ``_g0()`` appends every valid configuration (a tuple in the space's variable order) to ``_out``,
    adds the values it tried to ``_count[0]`` (the fused innermost levels count as their outermost),
    and returns False if it stopped at ``_limit``. A check that fails for a value of a level's
    variable and can only keep failing for larger values ends that level's loop (``break``).
    """
    pos = {n: i for i, n in enumerate(order)}
    lo = {n: d[0] for n, d in domains.items()}
    hi = {n: d[-1] for n, d in domains.items()}
    namespace: dict[str, Any] = dict(_GLOBALS)
    levels = []  # (variable, candidates source, [(check source, ends the loop)])
    for i, v in enumerate(order):
        # Candidates: the domain, or the values an assigned two-variable partner allows (the partner
        # allowing the fewest on average; the other partners filter).
        supports = []
        for k, allowed in pairs.items():
            c = cons[k]
            if v in c.names and all(pos[n] <= i for n in c.names):
                other = c.names[0] if c.names[1] == v else c.names[1]
                flip = c.names[0] == v
                table: dict[int, list[int]] = {x: [] for x in domains[other]}
                for pair in sorted(allowed):
                    x, y = (pair[1], pair[0]) if flip else pair
                    if x in table and y in domains[v]:
                        table[x].append(y)
                table = {x: tuple(sorted(ys)) for x, ys in table.items()}
                supports.append((sum(map(len, table.values())) / len(table), other, k, table))
        supports.sort(key=lambda s: s[0])
        checks = []  # (source, whether failing it fails every larger value of v too)
        if supports:
            _, other, k, table = supports[0]
            namespace[f"_T{k}"] = table
            candidates = f"_T{k}[{other}]"
        else:
            namespace[f"_D{i}"] = tuple(domains[v])
            candidates = f"_D{i}"
        for _, other, k, table in supports[1:]:
            namespace[f"_S{k}"] = {x: frozenset(ys) for x, ys in table.items()}
            checks.append((f"{v} in _S{k}[{other}]", False))
        # Bounds of polynomial constraints (exact once complete); the others once complete.
        for k, c in enumerate(cons):
            if v not in c.names or len(c.names) < 3:
                continue
            keep = {n for n in c.names if pos[n] <= i}
            if c.forms:
                if keep != {v}:  # over v alone, propagation has enforced it already
                    checks += c.bound_checks(keep, v, lo, hi)
            elif keep == set(c.names) and c.code is not None:
                checks.append((c.code, False))
            elif keep == set(c.names):
                namespace[f"_F{k}"] = c.exact(order[: i + 1], space)
                checks.append((f"_F{k}({', '.join(order[: i + 1])})", False))
        checks.sort(key=lambda check: not check[1])  # those that can end the loop first
        levels.append((v, candidates, checks))

    row = f"({', '.join(space.names)},)"
    fused = min(_FUSED_LEVELS, len(order)) if limit is None else 0
    functions: list[list[str]] = []
    depth = 0  # loops open in the current function

    def emit(line: str) -> None:
        functions[-1].append("    " * (depth + 1) + line)

    for i, (v, candidates, checks) in enumerate(levels):
        if i % _LEVELS_PER_FUNCTION == 0:
            args = ", ".join(order[:i])
            if i:  # the deeper levels go to the next function
                emit(f"if not _g{i}({args}):")
                emit("    _count[0] += _n")
                emit("    return False")
            functions.append([f"def _g{i}({args}):", "    _n = 0"])
            depth = 0
        if i == len(levels) - fused:  # the innermost levels as one comprehension: no early end, faster
            clauses = []
            for u, cands, conds in levels[i:]:
                clauses.append(f"for {u} in {cands}")
                clauses += [f"if {code}" for code, _ in conds]
            emit(f"_n += len({candidates})")
            emit(f"_out.extend([{row} {' '.join(clauses)}])")
            break
        emit(f"for {v} in {candidates}:")
        depth += 1
        emit("_n += 1")
        for code, ends in checks:
            emit(f"if not ({code}): {'break' if ends else 'continue'}")
        if i == len(levels) - 1:
            emit(f"_out.append({row})")
            emit("if len(_out) >= _limit:")
            emit("    _count[0] += _n")
            emit("    return False")
    source = "".join("\n".join([*f, "    _count[0] += _n", "    return True"]) + "\n\n" for f in functions)
    return source, namespace


def brute_force(space: Space, limit: int | None = None) -> SolveResult:
    """Filter the full Cartesian product with the same compiled constraints (for tests and benchmarks)."""
    start = time.perf_counter()
    names = space.names
    cons = _compile(space)
    fns = [c.exact(names, space) for c in cons if c.constant is None]
    found: list[tuple[int, ...]] = []
    complete = True
    if all(c.constant is not False for c in cons):
        for config in itertools.product(*(v.domain for v in space.variables)):
            for ok in fns:
                if not ok(*config):
                    break
            else:
                found.append(config)
                if limit is not None and len(found) >= limit:
                    complete = False
                    break
    return SolveResult(
        names=names, rows=found, space_size=space.size, valid=len(found), seconds=time.perf_counter() - start,
        pruned_by_propagation=0, nodes=space.size, complete=complete, order=names,
        domains={v.name: v.domain for v in space.variables})
