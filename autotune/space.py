"""A search space: named integer variables, their domains, and sympy constraints over them.

A template declares its space once: the variables (tile sizes, stages, vector
widths) with their domains, the constraints as sympy relations over the
variables and over *parameter* symbols (the workload's extents ``M, N, K``, the
target's limits ``SMEM, MAX_THREADS, WARP, REGS``), and the numbers the
parameters stand for. The solver, the cost model and the code generators read
that declaration; none of them restates a limit. A constraint is an
expression, never a closure over outside variables, so it can be printed,
checked, compiled and reasoned about (bounds, divisibility).

Constraints are sympy relations (``Eq, Ne, Le, Lt, Ge, Gt``), boolean
combinations of them (``And, Or, Not``), and divisibility written as
``Eq(Mod(a, b), 0)``. Domains are positive integers (sizes and counts), which
is what makes the solver's capacity bounds sound.

>>> BM, BN = symbols("BM BN")
>>> s = Space("demo", [Var("BM", powers_of_two(16, 256)), Var("BN", powers_of_two(16, 256))],
...           [Constraint(sympy.Le(BM * BN, sympy.Symbol("MAX")), "tile area"),
...            sympy.Eq(sympy.Mod(sympy.Symbol("M"), BM), 0)],
...           params={"MAX": 4096, "M": 96})
>>> s.size, s.check({"BM": 64, "BN": 128})
(25, ['BM*BN <= MAX [tile area]: 8192 <= 4096 is false', 'Eq(Mod(M, BM), 0): Mod(96, 64) = 32'])
"""

from __future__ import annotations

import keyword
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any

import sympy

from optic.errors import OpticError

__all__ = [
    "Constraint",
    "Space",
    "SpaceError",
    "Var",
    "divisors",
    "powers_of_two",
    "range_",
    "symbols",
]

# Names the compiled constraints and search use (optic.autotune.constraints); a variable may not shadow them.
_RESERVED = frozenset({"math", "Fraction", "min", "max", "abs", "len"})


class SpaceError(OpticError, ValueError):
    """A search space that cannot be built as declared (empty domain, unknown symbol, bad config)."""


def symbols(names: str) -> tuple[sympy.Symbol, ...]:
    """Integer, positive sympy symbols for variables or parameters: ``BM, BN = symbols("BM BN")``.

    Any symbol with the right name works in a constraint; these carry the
    assumptions the space uses, so sympy simplifies them the same way.
    """
    made = sympy.symbols(names, integer=True, positive=True, seq=True)
    return tuple(made)


def divisors(n: int) -> tuple[int, ...]:
    """The positive divisors of ``n``, ascending: ``divisors(12) == (1, 2, 3, 4, 6, 12)``."""
    if n < 1:
        raise SpaceError(f"divisors() needs a positive integer, got {n}")
    return tuple(int(d) for d in sympy.divisors(n))


def powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two ``p`` with ``lo <= p <= hi`` (both ends included)."""
    p, out = 1, []
    while p <= hi:
        if p >= lo:
            out.append(p)
        p *= 2
    return tuple(out)


def range_(lo: int, hi: int, step: int = 1) -> tuple[int, ...]:
    """``tuple(range(lo, hi, step))``: like ``range``, ``hi`` is excluded."""
    return tuple(range(lo, hi, step))


@dataclass(frozen=True)
class Var:
    """A tunable integer: a name (a Python identifier) and a domain of positive integers.

    The domain is kept sorted and without repeats; the solver relies on the ascending order.
    """

    name: str
    domain: tuple[int, ...]

    def __init__(self, name: str, domain: Iterable[int]):
        if not name.isidentifier() or keyword.iskeyword(name) or name in _RESERVED or name.startswith("_"):
            raise SpaceError(f"variable name {name!r} must be a Python identifier, not a keyword, "
                             f"not starting with '_' and none of {sorted(_RESERVED)}")
        values = tuple(domain)
        if not values:
            raise SpaceError(f"variable {name} has an empty domain")
        for v in values:
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise SpaceError(f"variable {name}: domain values are positive integers, got {v!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "domain", tuple(sorted({int(v) for v in values})))

    @property
    def symbol(self) -> sympy.Symbol:
        return sympy.Symbol(self.name, integer=True, positive=True)

    def __str__(self) -> str:
        return f"{self.name} in {{{', '.join(map(str, self.domain))}}}"


@dataclass(frozen=True)
class Constraint:
    """A sympy relation (or boolean combination of relations) and, optionally, the limit it expresses."""

    relation: Any
    why: str = ""

    def __str__(self) -> str:
        return f"{self.relation} [{self.why}]" if self.why else str(self.relation)


@dataclass(frozen=True, eq=False)
class Space:
    """Named integer variables with domains, constraints over them, and the numbers its parameters bind.

    ``variables`` are Var; ``constraints`` are sympy relations or Constraint (a
    relation with the limit it expresses); ``params`` binds every other symbol
    the constraints use (workload extents, target limits) to an integer;
    ``derived`` names expressions over variables and parameters that the cost
    model and code generators read (threads per block, shared-memory bytes) so
    that they are stated once; ``meta`` is free-form data about the template
    (operator, target, dtype, layout).
    """

    name: str
    variables: tuple[Var, ...]
    constraints: tuple[Constraint, ...]
    params: Mapping[str, int]
    derived: Mapping[str, sympy.Expr]
    meta: Mapping[str, Any]

    def __init__(
        self,
        name: str,
        variables: Sequence[Var],
        constraints: Sequence[Any] = (),
        params: Mapping[str, int] | None = None,
        derived: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ):
        variables = tuple(variables)
        names = [v.name for v in variables]
        if len(set(names)) != len(names):
            raise SpaceError(f"space {name}: variable names repeat: {names}")
        params = dict(params or {})
        for key, value in params.items():
            if isinstance(value, bool) or not isinstance(value, int | sympy.Integer):
                raise SpaceError(f"space {name}: parameter {key} must be an integer, got {value!r}")
            if key in names:
                raise SpaceError(f"space {name}: {key} is both a variable and a parameter")
        params = {k: int(v) for k, v in params.items()}
        canonical = {v.name: v.symbol for v in variables}
        canonical.update({p: sympy.Symbol(p, integer=True) for p in params})

        def resolve(expr: Any, what: str) -> Any:
            expr = sympy.sympify(expr)
            unknown = sorted(s.name for s in expr.free_symbols if s.name not in canonical)
            if unknown:
                raise SpaceError(f"space {name}: {what} uses {', '.join(unknown)}, which is neither a "
                                 f"variable ({', '.join(names)}) nor a bound parameter ({', '.join(params)})")
            return expr.xreplace({s: canonical[s.name] for s in expr.free_symbols})

        cons = []
        for c in constraints:
            c = c if isinstance(c, Constraint) else Constraint(c)
            if not isinstance(c.relation, sympy.logic.boolalg.Boolean | bool):
                raise SpaceError(f"space {name}: constraint {c.relation!r} is not a sympy relation "
                                 "(write Eq/Ne/Le/Lt/Ge/Gt, Eq(Mod(a, b), 0), And/Or/Not)")
            cons.append(Constraint(resolve(c.relation, f"constraint {c}"), c.why))
        derived_exprs = {k: resolve(e, f"derived {k}") for k, e in (derived or {}).items()}
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "variables", variables)
        object.__setattr__(self, "constraints", tuple(cons))
        object.__setattr__(self, "params", MappingProxyType(params))
        object.__setattr__(self, "derived", MappingProxyType(derived_exprs))
        object.__setattr__(self, "meta", MappingProxyType(dict(meta or {})))
        object.__setattr__(self, "_symbols", MappingProxyType(canonical))
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(names)})

    def with_meta(self, **extra: Any) -> Space:
        """The same space with ``extra`` added to its ``meta`` (what a code generator's option tells the cost
        model, e.g. a matmul's B packed ahead); the declaration is shared, not solved again."""
        import copy

        other = copy.copy(self)
        object.__setattr__(other, "meta", MappingProxyType({**self.meta, **extra}))
        return other

    # -- the declaration ------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """Variable names, in declaration order (the order of a config's keys)."""
        return tuple(v.name for v in self.variables)

    @property
    def symbols(self) -> Mapping[str, sympy.Symbol]:
        """The sympy symbol of every variable and parameter, by name (variables first)."""
        return self._symbols

    @property
    def size(self) -> int:
        """Size of the Cartesian product of the domains (what brute force would enumerate)."""
        return math.prod(len(v.domain) for v in self.variables)

    def var(self, name: str) -> Var:
        return self.variables[self._index[name]]

    def restrict(self, **domains: Iterable[int]) -> Space:
        """The same space with some domains replaced (a smaller space for a test or a sweep)."""
        unknown = sorted(set(domains) - set(self._index))
        if unknown:
            raise SpaceError(f"space {self.name} has no variable {', '.join(unknown)}")
        variables = [Var(v.name, domains.get(v.name, v.domain)) for v in self.variables]
        return Space(self.name, variables, self.constraints, self.params, self.derived, self.meta)

    def bound(self, expr: Any) -> Any:
        """``expr`` (a relation or expression) with the parameters replaced by their numbers."""
        subs = {self._symbols[p]: sympy.Integer(v) for p, v in self.params.items()}
        return sympy.sympify(expr).xreplace(subs)

    # -- configurations -------------------------------------------------------------------------

    def _values(self, config: Mapping[str, int]) -> dict[str, sympy.Integer]:
        missing = [n for n in self.names if n not in config]
        extra = sorted(set(config) - set(self._index))
        if missing or extra:
            raise SpaceError(f"config for space {self.name}: missing {missing}, unknown {extra}")
        values = {n: sympy.Integer(int(config[n])) for n in self.names}
        values.update({p: sympy.Integer(v) for p, v in self.params.items()})
        return values

    @staticmethod
    def _at(expr: Any, values: Mapping[str, sympy.Integer]) -> Any:
        """``expr`` with its symbols, matched by name, replaced by ``values``."""
        return expr.xreplace({s: values[s.name] for s in expr.free_symbols if s.name in values})

    def check(self, config: Mapping[str, int]) -> list[str]:
        """The constraints ``config`` violates, as readable strings; empty when it is valid.

        Evaluated exactly by sympy (the reference semantics the solver's compiled
        checks must agree with). A value outside its variable's domain is a violation too.
        """
        values = self._values(config)
        out = [f"{v.name}={config[v.name]} is not in its domain {v.domain}"
               for v in self.variables if int(config[v.name]) not in v.domain]
        for c in self.constraints:
            try:
                value = self._at(c.relation, values)
                undefined = any(self._at(side, values).has(sympy.zoo, sympy.nan)
                                for rel in c.relation.atoms(sympy.Rel) for side in rel.args)
            except (TypeError, ZeroDivisionError) as e:  # e.g. comparing an infinite quotient
                out.append(f"{c}: undefined ({e})")
                continue
            if undefined:  # a division by zero satisfies no constraint
                out.append(f"{c}: undefined (division by zero)")
            elif value is not sympy.true:
                out.append(f"{c}: {_explain(c.relation, values)}")
        return out

    def is_valid(self, config: Mapping[str, int]) -> bool:
        return not self.check(config)

    def evaluate(self, expr: Any, config: Mapping[str, int]) -> int | Fraction:
        """The exact value of a derived quantity (by name) or of an expression, for ``config``."""
        if isinstance(expr, str):
            expr = self.derived[expr]
        value = self._at(sympy.sympify(expr), self._values(config))
        if value.is_Integer:
            return int(value)
        if value.is_Rational:
            return Fraction(int(value.p), int(value.q))
        raise SpaceError(f"{expr} does not evaluate to a rational number for {dict(config)}: {value}")

    def __str__(self) -> str:
        lines = [f"Space {self.name}: {len(self.variables)} variables, {self.size:,} configurations"]
        if self.params:
            lines.append("  params: " + ", ".join(f"{k}={v}" for k, v in self.params.items()))
        lines.append("  variables:")
        lines += [f"    {v}" for v in self.variables]
        if self.derived:
            lines.append("  derived:")
            lines += [f"    {k} = {e}" for k, e in self.derived.items()]
        lines.append("  constraints:")
        lines += [f"    {c}" for c in self.constraints]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Space {self.name}: {len(self.variables)} variables, {len(self.constraints)} constraints>"


def _explain(relation: Any, values: Mapping[str, sympy.Integer]) -> str:
    """Why ``relation`` fails at ``values``: both sides evaluated, or the value of a Mod."""
    if isinstance(relation, sympy.Rel):
        try:
            lhs, rhs = (Space._at(side, values) for side in (relation.lhs, relation.rhs))
        except (TypeError, ZeroDivisionError) as e:
            return f"undefined ({e})"
        if isinstance(relation, sympy.Eq) and rhs == 0 and isinstance(relation.lhs, sympy.Mod):
            a, b = (Space._at(arg, values) for arg in relation.lhs.args)
            return f"Mod({a}, {b}) = {lhs}"
        return f"{lhs} {relation.rel_op} {rhs} is false"
    return "false"
