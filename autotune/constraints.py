"""Constraints compiled to plain Python over integers, and the polynomial bounds the solver prunes with.

A constraint, with the space's parameters substituted, becomes Python source that sympy never
sees again:

- a polynomial relation in the variables, negative powers allowed (``BM*BN/(TM*TN) <= 1024``),
  has its denominators cleared: they are a positive integer times a monomial in positive
  variables, so the sign, and the relation, is kept (``BM*BN - 1024*TM*TN <= 0``);
- divisibility ``Eq(Mod(a, b), 0)`` with ``b`` a single term becomes ``P % Q == 0`` for
  ``a/b == P/Q`` cleared the same way (``Mod(4096, BM)`` -> ``4096 % BM == 0``);
- ``And``, ``Or``, ``Not`` of those combine their sources;
- anything else (``ceiling``, ``Min``, a non-monomial divisor) is evaluated with ``Fraction``:
  exact for rational arithmetic, slower.

A polynomial relation also yields bounds while some of its variables are unassigned: each term
of ``g`` in ``g <= 0`` is at least its value at one corner of the remaining domains (all
variables are positive, so a monomial is monotone in each), which gives a necessary condition
over the assigned variables; when that condition is linear in the newest variable, it is a
bound on it (``Check.cut``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import sympy
from sympy.printing.pycode import PythonCodePrinter

from .space import Space

__all__ = ["GLOBALS", "Check", "CompiledConstraint", "Laurent", "compile_constraints", "function"]

Mono = tuple[tuple[str, int], ...]  # (variable, nonzero exponent), sorted by name


class Laurent:
    """A sum of rational coefficients times monomials with integer (possibly negative) exponents."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[Mono, Fraction]):
        self.terms = {m: c for m, c in terms.items() if c}

    @staticmethod
    def of(expr: Any, names: frozenset[str]) -> Laurent | None:
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
        return Laurent(terms)

    def __neg__(self) -> Laurent:
        return Laurent({m: -c for m, c in self.terms.items()})

    @property
    def names(self) -> set[str]:
        return {v for m in self.terms for v, _ in m}

    def lower_bound(self, keep: set[str], lo: Mapping[str, int], hi: Mapping[str, int]) -> Laurent:
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
        return Laurent(terms)

    def nondecreasing_in(self, v: str) -> bool:
        """True if the value can only grow with ``v`` (every term with ``v`` has coefficient and exponent of one sign)."""
        return all(c * e > 0 for m, c in self.terms.items() for u, e in m if u == v)

    def cleared(self) -> tuple[Laurent, Laurent]:
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
        return Laurent(num), Laurent(den)

    def quotient(self, other: Laurent) -> Laurent | None:
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
        return Laurent(terms)

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
GLOBALS = {"__builtins__": {"min": min, "max": max, "abs": abs, "len": len}, "math": math, "Fraction": Fraction,
            "_bl": bisect.bisect_left, "_br": bisect.bisect_right}


def function(args: Sequence[str], body: str) -> Callable[..., bool]:
    return eval(f"lambda {', '.join(args)}: {body}", dict(GLOBALS))  # noqa: S307 - source built here


class _FractionPrinter(PythonCodePrinter):
    """Python code that computes exactly with fractions: variables and rational constants are Fractions."""

    def _print_Symbol(self, expr: Any) -> str:
        return f"Fraction({expr.name})"

    def _print_Rational(self, expr: Any) -> str:
        return f"Fraction({expr.p}, {expr.q})"

    _print_Half = _print_Rational


def _as_relation(rel: Any, names: frozenset[str]) -> tuple[str, Laurent] | None:
    """(op, g) with ``rel <=> g op 0`` and g a Laurent polynomial, or None."""
    if type(rel) in _OPS:
        op, g = _OPS[type(rel)], Laurent.of(rel.lhs - rel.rhs, names)
    elif type(rel) in _FLIPPED:
        op, g = _FLIPPED[type(rel)], Laurent.of(rel.rhs - rel.lhs, names)
    else:
        return None
    return None if g is None else (op, g)


def _as_divisibility(rel: Any, names: frozenset[str]) -> tuple[str, Laurent, Laurent] | None:
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
    a, b = (Laurent.of(arg, names) for arg in mod.args)
    ratio = a.quotient(b) if a is not None and b is not None else None
    if ratio is None:
        return None
    num, den = ratio.cleared()
    return _OPS[type(rel)], num, den


def _analyse(rel: Any, names: frozenset[str]) -> tuple[str | None, tuple[str, Laurent] | None]:
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


class CompiledConstraint:
    """One constraint with the parameters substituted, compiled for the solver."""

    def __init__(self, relation: Any, space: Space):
        free = {s.name for s in relation.free_symbols}
        self.relation = relation
        self.names = tuple(n for n in space.names if n in free)
        self.constant = bool(relation) if not self.names else None
        self.code, poly = _analyse(relation, frozenset(space.names))
        # Bounding forms h (h <= 0, or h < 0 when strict) whose conjunction is the constraint.
        self.forms: list[tuple[Laurent, bool]] = []
        if poly is not None:
            op, g = poly
            self.forms = {"<=": [(g, False)], "<": [(g, True)], "==": [(g, False), (-g, False)]}.get(op, [])

    def exact(self, args: Sequence[str], space: Space) -> Callable[..., bool]:
        """The constraint as a function of ``args`` (which include all its variables), exact."""
        if self.code is not None:
            return function(args, self.code)
        fn = function(args, _FractionPrinter().doprint(self.relation))

        def exact_rational(*values: int) -> bool:
            try:
                return bool(fn(*values))
            except ZeroDivisionError:  # sympy makes that nan/zoo, which satisfies no relation
                return False

        return exact_rational

    def admits(self, v: str, values: Sequence[int], lo: Mapping[str, int], hi: Mapping[str, int]) -> list[int]:
        """The ``values`` of ``v`` that pass every bound with the other variables at their most
        favourable ends of ``lo..hi`` (a polynomial constraint; all of ``values`` otherwise)."""
        kept = list(values)
        for h, strict in self.forms:
            num = h.lower_bound({v}, lo, hi).cleared()[0]
            terms = [(int(c), dict(m).get(v, 0)) for m, c in num.terms.items()]
            limit = -1 if strict else 0
            kept = [x for x in kept if sum(c * x**e for c, e in terms) <= limit]
        return kept

    def bound_checks(self, keep: set[str], new: str, lo: Mapping[str, int],
                     hi: Mapping[str, int]) -> list[Check]:
        """Necessary conditions over the assigned variables ``keep`` (exact when ``keep`` holds them
        all), for the level that assigns ``new``."""
        checks = []
        for h, strict in self.forms:
            bound = h.lower_bound(keep, lo, hi)
            num = bound.cleared()[0]
            code = f"{num.code()} {'<' if strict else '<='} 0"
            checks.append(Check(code, bound.nondecreasing_in(new), _cut(num, new, strict)))
        return checks


class Check(NamedTuple):
    code: str  # Python source, true when the check passes
    ends: bool  # failing it at a value of the level's variable fails every larger value too
    cut: tuple[str, str] | None = None  # ("lower" or "upper", source of that bound on the variable)


def _cut(num: Laurent, v: str, strict: bool) -> tuple[str, str] | None:
    """``num <= 0`` (``< 0`` if strict) as a bound on ``v`` when ``num = a*v + b`` with ``a`` of one
    sign for positive variables (every term with v has a coefficient of the same sign): then
    ``v <= floor(-b/a)`` or ``v >= ceil(b/-a)``, computed once instead of tested for each value."""
    a: dict[Mono, Fraction] = {}
    b: dict[Mono, Fraction] = {}
    for m, c in num.terms.items():
        exps = dict(m)
        e = exps.pop(v, 0)
        if e > 1:
            return None
        (a if e else b)[tuple(sorted(exps.items()))] = c
    slack = Fraction(1 if strict else 0)  # integers: x < 0  <=>  x + 1 <= 0
    rest = Laurent({**b, (): b.get((), Fraction(0)) + slack})  # b + slack
    if a and all(c > 0 for c in a.values()):  # v <= floor(-(b + slack) / a)
        return "upper", f"{(-rest).code()} // {Laurent(a).code()}"
    if a and all(c < 0 for c in a.values()):  # v >= ceil((b + slack) / -a)
        return "lower", f"-({(-rest).code()} // {(-Laurent(a)).code()})"
    return None


def compile_constraints(space: Space) -> list[CompiledConstraint]:
    return [CompiledConstraint(space.bound(c.relation), space) for c in space.constraints]
