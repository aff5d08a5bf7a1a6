"""Enumerate every configuration of a Space that satisfies all its constraints, without building the product.

``solve`` is propagation plus a level-by-level search over constraints compiled once to integer
Python code (:mod:`optic.autotune.constraints`; sympy is never called while searching):

1. Propagation before the search. A constraint over one variable filters its domain; one over
   two variables is made arc consistent (a value stays only if some value of the other variable
   allows it, so divisor and multiple domains fall out); a polynomial one over more variables
   removes the values that fail even with every other variable at its most favourable domain
   end (``STAGES*(BM*BK + BK*BN)*BYTES <= SMEM`` caps BM given the smallest BK, BN, STAGES).
   Repeated until nothing changes.
2. Variable order: next the variable that completes the most constraints, then the one tied to
   the most already placed, then the most constrained, then the smallest domain.
3. Search, one level per variable in that order, each level over the whole frontier at once
   (numpy): the frontier is every partial configuration that passed so far, the rows of one
   integer matrix; a level pairs each frontier row with every value of its variable and keeps
   the pairs that pass its checks (a grid of rows x values), which are

   - the allowed-pair table of each two-variable constraint whose other variable is assigned;
   - each polynomial constraint as a bound as soon as one of its variables is assigned (the
     unassigned ones at their most favourable domain ends), exactly once all are; one linear in
     the level's variable is computed once per row as a bound on it (``STAGES <= B(BM, BN, BK)``);
   - every other constraint once complete.

   A check is evaluated on int64 arrays when interval arithmetic over the domains shows that no
   intermediate value can overflow, on arrays of Python integers otherwise (exact either way); a
   check numpy cannot evaluate elementwise (``and``/``or``, ``Fraction``) becomes a truth table
   over its variables' domains, or is called row by row when that table would be larger than the
   frontier. A frontier larger than ``_CELLS`` candidates is split into chunks searched depth
   first, which bounds memory, keeps the order a depth-first search would find, and lets
   ``limit`` stop early.

The result is an integer array, one row per configuration; ``SolveResult.rows`` (tuples) and
``configs`` (dicts) are built from it on first use.

``brute_force`` filters the full product with the same compiled constraints (in declaration
order, stopping at the first that fails), so comparing the two measures the search, not the
evaluation of constraints. ``Space.check`` (sympy, exact) is the independent reference the tests
hold both to.
"""

from __future__ import annotations

import ast
import functools
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constraints import CompiledConstraint, Laurent, _cut, compile_constraints
from .space import Space

__all__ = ["SolveResult", "brute_force", "solve"]


@dataclass(frozen=True, eq=False)
class SolveResult:
    """Every valid configuration of a space (or the first ``limit``), with what it took to find them.

    ``found`` holds the configurations as the enumeration produced them, in the order of ``names``
    (the space's variables): an array with one row each, in the narrowest integer type that holds
    the domains (``solve``), or a list of tuples (``brute_force``). ``rows`` (tuples), ``array``
    (int64) and ``configs`` (dicts) are the same configurations, built on first use: building tens
    of thousands of Python tuples costs more than finding them. The order is the enumeration's:
    deterministic for a given space, but the solver's differs from brute force's, so compare them
    sorted.
    ``pruned_by_propagation`` is how many configurations of the product propagation removed before
    the search (``space_size`` minus the product of the propagated domain sizes); ``nodes`` counts
    the values the search tried at every level but the innermost (brute force: ``space_size``).
    """

    names: tuple[str, ...]
    found: np.ndarray | list[tuple[int, ...]] = field(repr=False)
    space_size: int
    valid: int
    seconds: float
    pruned_by_propagation: int
    nodes: int = 0
    complete: bool = True  # False when ``limit`` stopped the enumeration early
    order: tuple[str, ...] = ()  # the variable order the search used, outermost first
    domains: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # after propagation

    @functools.cached_property
    def rows(self) -> list[tuple[int, ...]]:
        if isinstance(self.found, list):
            return self.found
        if not self.names:
            return [()] * len(self.found)
        if self.found.dtype == object:
            columns: list[Any] = self.found.T.tolist()
        else:  # a memoryview of a column iterates as Python ints, without a list of them in between
            columns = [memoryview(column) for column in np.ascontiguousarray(self.found.T)]
        return list(zip(*columns))  # noqa: B905 - one column per variable, all of one length

    @functools.cached_property
    def array(self) -> np.ndarray:
        """One row per configuration, int64 (Python integers where a value does not fit)."""
        if isinstance(self.found, list):
            return _array(self.found).reshape(len(self.found), len(self.names))
        return self.found if self.found.dtype == object else self.found.astype(np.int64)

    @functools.cached_property
    def configs(self) -> list[dict[str, int]]:
        names = self.names
        return [dict(zip(names, row)) for row in self.rows]  # noqa: B905 - rows have len(names)

    def summary(self) -> str:
        more = "" if self.complete else " (stopped at the limit)"
        return (f"{self.space_size:,} configurations, {self.valid:,} valid{more}, "
                f"{self.seconds * 1e3:.1f} ms, {self.pruned_by_propagation:,} removed by propagation, "
                f"{self.nodes:,} search nodes")


# -- propagation ---------------------------------------------------------------------------------------

Pairs = dict[int, set[tuple[int, int]]]  # constraint index -> allowed (value of names[0], value of names[1])


def _propagate(space: Space, cons: list[CompiledConstraint], domains: dict[str, list[int]]) -> Pairs | None:
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
    # Worklist: a constraint is revised again when a domain it reads has shrunk.
    active = [k for k, c in enumerate(cons) if k in pairs or (len(c.names) > 2 and c.forms)]
    touching = {v: [k for k in active if v in cons[k].names] for v in domains}
    queue, queued = list(active), set(active)
    while queue:
        k = queue.pop(0)
        queued.discard(k)
        c = cons[k]
        if k in pairs:
            a, b = c.names
            da, db = set(domains[a]), set(domains[b])
            allowed = {a: {x for x, y in pairs[k] if y in db}, b: {y for x, y in pairs[k] if x in da}}
            revised = {v: [x for x in domains[v] if x in allowed[v]] for v in (a, b)}
        else:
            lo = {v: d[0] for v, d in domains.items()}
            hi = {v: d[-1] for v, d in domains.items()}
            revised = {v: c.admits(v, domains[v], lo, hi) for v in c.names}
        for v, new in revised.items():
            if len(new) == len(domains[v]):
                continue
            if not new:
                return None
            domains[v] = new
            for j in touching[v]:
                if j != k and j not in queued:
                    queue.append(j)
                    queued.add(j)
    return pairs


def _order(names: Sequence[str], domains: Mapping[str, list[int]], cons: list[CompiledConstraint]) -> list[str]:
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
    if given), by propagation and a vectorized level-by-level search; see the module docstring."""
    start = time.perf_counter()
    names = space.names
    cons = compile_constraints(space)
    domains = {v.name: list(v.domain) for v in space.variables}
    pairs = None if any(c.constant is False for c in cons) else _propagate(space, cons, domains)
    order: Sequence[str] = names
    found = np.zeros((0, len(names)), dtype=np.int64)
    nodes, complete = 0, True
    if pairs is None:
        domains = {n: [] for n in names}
    elif not names:  # nothing to choose: the one empty configuration
        found = np.zeros((1, 0), dtype=np.int64)
    elif limit is not None and limit <= 0:
        complete = False
    else:
        order = _order(names, domains, cons)
        found, nodes, complete = _Search(space, cons, pairs, order, domains, limit).run()
    kept = math.prod(len(d) for d in domains.values())
    return SolveResult(
        names=names, found=found, space_size=space.size, valid=len(found), seconds=time.perf_counter() - start,
        pruned_by_propagation=space.size - kept, nodes=nodes, complete=complete, order=tuple(order),
        domains={n: tuple(d) for n, d in domains.items()})


_CELLS = 1 << 18  # candidates (frontier rows x values) one step evaluates at once; a larger frontier is chunked
_INT64_SAFE = 1 << 62  # a check runs in int64 only if every intermediate is provably smaller than this


def _array(values: Sequence[Any]) -> np.ndarray:
    """int64 if every value fits, else Python integers (object): exact either way."""
    try:
        return np.asarray(values, dtype=np.int64)
    except OverflowError:
        return np.array(values, dtype=object)


@dataclass
class _Check:
    """One check at a level, ``fn`` over ``names``: vectorized (``code``, elementwise over numpy arrays), or
    the exact function of a constraint, applied through a truth table or row by row."""

    names: tuple[str, ...]  # the variables it reads, in the order fn takes them
    code: str | None = None  # Python source of a vectorized check
    int64: bool = True  # intermediate values provably fit in int64 (else evaluated on Python integers)
    fn: Callable[..., Any] | None = None
    key: int = 0  # the constraint's index, to cache its truth table


@dataclass
class _Level:
    """Where the search assigns ``name``: its propagated domain, the allowed-pair tables of two-variable
    constraints with an earlier partner, and the other checks."""

    name: str
    values: np.ndarray
    tables: list[tuple[str, _PairTable]] = field(default_factory=list)
    checks: list[_Check] = field(default_factory=list)  # vectorized, over the whole grid
    others: list[_Check] = field(default_factory=list)  # the rest, over the candidates that pass


class _PairTable:
    """Which values of a variable an earlier partner's value allows: bool[partner value, index here],
    looked up directly by value when the partner's values are small, through its domain index otherwise."""

    def __init__(self, partner: Sequence[int], allowed: np.ndarray):
        self.partner = _array(partner)
        if partner[-1] <= _BY_VALUE:
            self.by_value: np.ndarray | None = np.zeros((partner[-1] + 1, allowed.shape[1]), dtype=bool)
            self.by_value[self.partner] = allowed
        else:
            self.by_value, self.allowed = None, allowed

    def __getitem__(self, partner_values: np.ndarray) -> np.ndarray:
        if self.by_value is not None:
            return np.take(self.by_value, partner_values.astype(np.intp, copy=False), axis=0)
        return np.take(self.allowed, np.searchsorted(self.partner, partner_values), axis=0)


_BY_VALUE = 1 << 12  # a pair table is indexed by the partner's value when its values are at most this


class _Search:
    """The level-by-level search of the module docstring, for one space, order and set of domains.

    The frontier is one matrix: a row per partial configuration, a column per variable in the space's
    order (unassigned ones hold 0), in the narrowest integer type that holds every domain (memory is
    most of a step's cost). A step gathers whole rows, so the last frontier is the result."""

    def __init__(self, space: Space, cons: list[CompiledConstraint], pairs: Pairs, order: Sequence[str],
                 domains: Mapping[str, list[int]], limit: int | None):
        self.domains, self.limit = domains, limit
        pos = {n: i for i, n in enumerate(order)}
        lo = {n: d[0] for n, d in domains.items()}
        hi = {n: d[-1] for n, d in domains.items()}
        index = {n: {x: j for j, x in enumerate(d)} for n, d in domains.items()}
        self.levels: list[_Level] = []
        for i, v in enumerate(order):
            level = _Level(v, _array(domains[v]))
            for k, c in enumerate(cons):
                keep = {n for n in c.names if pos[n] <= i}
                if v not in c.names or len(c.names) < 2:
                    continue
                if k in pairs:
                    if keep == set(c.names):
                        other = c.names[0] if c.names[1] == v else c.names[1]
                        allowed = np.zeros((len(domains[other]), len(domains[v])), dtype=bool)
                        for pair in pairs[k]:
                            x, y = pair if c.names[0] == other else pair[::-1]
                            if x in index[other] and y in index[v]:
                                allowed[index[other][x], index[v][y]] = True
                        level.tables.append((other, _PairTable(domains[other], allowed)))
                elif c.forms:  # bounds while incomplete (over v alone, propagation enforced them), exact once complete
                    if keep != {v}:
                        level.checks += [_bound(h, strict, keep, v, lo, hi) for h, strict in c.forms]
                elif keep == set(c.names):
                    check = _vectorized(c.code, c.names, lo, hi) if c.code is not None else None
                    if check is None:
                        check = _Check(c.names, fn=c.exact(c.names, space), key=k)
                    (level.checks if check.code else level.others).append(check)
            self.levels.append(level)
        # The vectorized checks as functions of the variables they read, compiled together.
        checks = [check for level in self.levels for check in level.checks]
        source = "".join(f"lambda {', '.join(check.names)}: {check.code},\n" for check in checks)
        for check, fn in zip(checks, eval(f"({source})", {"__builtins__": {}}), strict=True):  # noqa: S307
            check.fn = fn
        self.column = {n: j for j, n in enumerate(space.names)}
        largest = max(hi.values())
        self.dtype = next((np.dtype(t) for t in (np.int16, np.int32, np.int64) if largest <= np.iinfo(t).max),
                          np.dtype(object))
        self.truth: dict[int, np.ndarray] = {}  # constraint index -> truth table over its variables' domains
        self.found: list[np.ndarray] = []
        self.count = 0
        self.nodes = 0

    def run(self) -> tuple[np.ndarray, int, bool]:
        """(configurations as rows in the space's variable order, nodes, complete)."""
        stopped = self._descend(0, np.zeros((1, len(self.column)), dtype=self.dtype))
        found = np.concatenate(self.found) if len(self.found) > 1 else (
            self.found[0] if self.found else np.zeros((0, len(self.column)), dtype=self.dtype))
        return found[: self.limit], self.nodes, not stopped

    def _descend(self, i: int, frontier: np.ndarray) -> bool:
        """Search below level ``i`` from the rows of ``frontier``; True if the limit stopped it."""
        if i == len(self.levels):
            self.found.append(frontier)
            self.count += len(frontier)
            return self.limit is not None and self.count >= self.limit
        level = self.levels[i]
        step = max(1, _CELLS // len(level.values))
        for first in range(0, len(frontier), step):
            chunk = frontier[first: first + step]
            if i < len(self.levels) - 1:
                self.nodes += len(chunk) * len(level.values)
            child = self._step(level, chunk)
            if len(child) and self._descend(i + 1, child):
                return True
        return False

    def _step(self, level: _Level, frontier: np.ndarray) -> np.ndarray:
        """The rows of ``frontier`` times the values of ``level``'s variable that pass its checks."""
        v, values, column = level.name, level.values, self.column
        mask = np.ones((len(frontier), len(values)), dtype=bool)
        for other, table in level.tables:
            mask &= table[frontier[:, column[other]]]
        for check in level.checks:
            if not mask.any():
                break
            exact = np.int64 if check.int64 else object
            ok = check.fn(*(values.astype(exact)[None, :] if name == v else frontier[:, column[name], None].astype(exact)
                            for name in check.names))
            mask &= np.asarray(ok, dtype=bool)
        rows, picks = np.nonzero(mask)
        for check in level.others:
            if len(rows):
                keep = self._other(check, level, np.take(frontier, rows, axis=0), values[picks])
                rows, picks = rows[keep], picks[keep]
        child = np.take(frontier, rows, axis=0)  # whole rows: several times faster than frontier[rows]
        child[:, column[v]] = values[picks]
        return child

    def _other(self, check: _Check, level: _Level, candidates: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Which candidates (their frontier rows, and the values of the level's variable) pass a check numpy
        cannot evaluate: by its truth table over its variables' domains when that is no larger than the
        candidates (built once), else by calling it on each."""
        at = {name: values if name == level.name else candidates[:, self.column[name]] for name in check.names}
        sizes = [len(self.domains[name]) for name in check.names]
        if check.key not in self.truth and math.prod(sizes) > len(values):
            return np.fromiter(map(check.fn, *(at[name].tolist() for name in check.names)), dtype=bool,
                               count=len(values))
        if check.key not in self.truth:
            product = itertools.product(*(self.domains[name] for name in check.names))
            truth = np.fromiter(itertools.starmap(check.fn, product), dtype=bool, count=math.prod(sizes))
            self.truth[check.key] = truth.reshape(sizes)
        where = tuple(np.searchsorted(_array(self.domains[name]), at[name]) for name in check.names)
        return self.truth[check.key][where]


def _bound(h: Laurent, strict: bool, keep: set[str], v: str, lo: Mapping[str, int], hi: Mapping[str, int]) -> _Check:
    """``h <= 0`` (``< 0`` if strict) as a check over the assigned variables ``keep``, the others at their
    most favourable domain ends: necessary, and exact once ``keep`` holds all of h's variables. Linear in
    the level's variable ``v``, it is a bound on ``v`` computed once per frontier row (``v <= B``)."""
    num = h.lower_bound(keep, lo, hi).cleared()[0]
    cut = _cut(num, v, strict)
    if cut is None:
        code = f"{num.code()} {'<' if strict else '<='} 0"
    else:
        code = f"{v} {'<=' if cut[0] == 'upper' else '>='} {cut[1]}"
    # Every intermediate (a partial sum of num's terms, of the bound's numerator or denominator, or their
    # quotient) is at most the sum of the terms' largest magnitudes, plus one for a strict bound.
    largest = 1 + sum(abs(int(c)) * math.prod(hi[u] ** e for u, e in m) for m, c in num.terms.items())
    return _Check(tuple(sorted(num.names | {v})), code, largest < _INT64_SAFE)


def _vectorized(code: str, names: tuple[str, ...], lo: Mapping[str, int], hi: Mapping[str, int]) -> _Check | None:
    """``code`` (over ``names``) as a check over numpy arrays, or None if it is not elementwise integer
    arithmetic and comparisons; in int64 when no intermediate can reach ``_INT64_SAFE`` over ``lo..hi``."""
    tree = ast.parse(code, mode="eval")
    largest = _largest(tree.body, lo, hi)
    if largest is None:
        return None
    return _Check(names, code, largest < _INT64_SAFE)


def _largest(node: ast.AST, lo: Mapping[str, int], hi: Mapping[str, int]) -> int | None:
    """The largest magnitude any intermediate of ``node`` takes over the box ``lo..hi`` (interval
    arithmetic, so an upper bound), or None if numpy cannot evaluate it elementwise exactly."""
    seen = [0]

    def interval(node: ast.AST) -> tuple[int, int] | None:
        out: tuple[int, int] | None = None
        if isinstance(node, ast.Constant) and type(node.value) is int:
            out = node.value, node.value
        elif isinstance(node, ast.Name) and node.id in lo:
            out = lo[node.id], hi[node.id]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            a = interval(node.operand)
            out = None if a is None else (-a[1], -a[0])
        elif isinstance(node, ast.BinOp):
            a, b = interval(node.left), interval(node.right)
            if a is None or b is None:
                return None
            if isinstance(node.op, ast.Add):
                out = a[0] + b[0], a[1] + b[1]
            elif isinstance(node.op, ast.Sub):
                out = a[0] - b[1], a[1] - b[0]
            elif isinstance(node.op, ast.Mult):
                corners = [x * y for x in a for y in b]
                out = min(corners), max(corners)
            elif isinstance(node.op, ast.Pow) and b[0] == b[1] and 0 <= b[0] <= 64:
                m = max(abs(a[0]), abs(a[1])) ** b[0]
                out = -m, m
            elif isinstance(node.op, ast.Mod) and b[0] > 0:  # Python's and numpy's: in [0, b)
                out = 0, b[1] - 1
            elif isinstance(node.op, ast.FloorDiv) and b[0] > 0:
                m = max(abs(a[0]), abs(a[1]))
                out = -m, m
        elif isinstance(node, ast.Compare) and len(node.ops) == 1:  # a chain would need `and`
            if interval(node.left) is not None and interval(node.comparators[0]) is not None:
                out = 0, 1
        if out is not None:
            seen[0] = max(seen[0], abs(out[0]), abs(out[1]))
        return out

    return None if interval(node) is None else seen[0]


def brute_force(space: Space, limit: int | None = None) -> SolveResult:
    """Filter the full Cartesian product with the same compiled constraints (for tests and benchmarks)."""
    start = time.perf_counter()
    names = space.names
    cons = compile_constraints(space)
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
        names=names, found=found, space_size=space.size, valid=len(found), seconds=time.perf_counter() - start,
        pruned_by_propagation=0, nodes=space.size, complete=complete, order=names,
        domains={v.name: v.domain for v in space.variables})
