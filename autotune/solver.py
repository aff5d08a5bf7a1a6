"""Enumerate every configuration of a Space that satisfies all its constraints, without building the product.

``solve`` is propagation plus backtracking over constraints compiled once to integer Python code
(:mod:`optic.autotune.constraints`; sympy is never called while searching):

1. Propagation before the search. A constraint over one variable filters its domain; one over
   two variables is made arc consistent (a value stays only if some value of the other variable
   allows it, so divisor and multiple domains fall out); a polynomial one over more variables
   removes the values that fail even with every other variable at its most favourable domain
   end (``STAGES*(BM*BK + BK*BN)*BYTES <= SMEM`` caps BM given the smallest BK, BN, STAGES).
   Repeated until nothing changes.
2. Variable order: next the variable that completes the most constraints, then the one tied to
   the most already placed, then the most constrained, then the smallest domain.
3. Search, generated as Python source: one loop per variable in that order. A variable's values
   come from the table of an assigned two-variable partner (the values it allows, ascending);
   each polynomial constraint is checked as a bound as soon as one of its variables is assigned,
   and exactly once all are; a bound linear in the newest variable slices its ascending values
   (computed once, not tested per value), and one that can only grow with it ends its loop at
   the first failure; other constraints are checked once complete. The two innermost levels run
   as one list comprehension.

``brute_force`` filters the full product with the same compiled constraints (in declaration
order, stopping at the first that fails), so comparing the two measures the search, not the
evaluation of constraints. ``Space.check`` (sympy, exact) is the independent reference the tests
hold both to.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .constraints import GLOBALS, Check, CompiledConstraint, compile_constraints
from .space import Space

__all__ = ["SolveResult", "brute_force", "solve"]


@dataclass(frozen=True)
class SolveResult:
    """Every valid configuration of a space (or the first ``limit``), with what it took to find them.

    ``rows`` are the configurations as tuples in the order of ``names`` (the space's variables), in
    the order the enumeration found them: deterministic for a given space, but the solver's order
    differs from brute force's, so compare them sorted. ``configs`` are the same as dicts, built
    on first use (building tens of thousands of dicts costs more than finding them).
    ``pruned_by_propagation`` is how many configurations of the product propagation removed before
    the search (``space_size`` minus the product of the propagated domain sizes); ``nodes`` counts
    the values the search tried at every level but the innermost (brute force: ``space_size``).
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
    if given), by propagation and backtracking; see the module docstring."""
    start = time.perf_counter()
    names = space.names
    cons = compile_constraints(space)
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
_FUSED_LEVELS = 2  # innermost levels enumerated by one list comprehension (when there is no limit)


def _search_source(space: Space, cons: list[CompiledConstraint], pairs: Pairs, order: Sequence[str],
                   domains: Mapping[str, list[int]], limit: int | None) -> tuple[str, dict[str, Any]]:
    """Python source of the search: one loop per variable, nested in ``order``, each level's checks
    inline; and the namespace it runs in (domains, candidate tables, the Fraction-evaluated checks).

    ``_g0()`` appends every valid configuration (a tuple in the space's variable order) to ``_out``,
    adds the values it tried to ``_count[0]`` (the fused innermost levels count as their outermost;
    with a limit, every level counts),
    and returns False if it stopped at ``_limit``. A check that fails for a value of a level's
    variable and can only keep failing for larger values ends that level's loop (``break``).
    """
    pos = {n: i for i, n in enumerate(order)}
    lo = {n: d[0] for n, d in domains.items()}
    hi = {n: d[-1] for n, d in domains.items()}
    namespace: dict[str, Any] = dict(GLOBALS)
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
        if supports:
            _, other, k, table = supports[0]
            namespace[f"_T{k}"] = table
            candidates = f"_T{k}[{other}]"
        else:
            namespace[f"_D{i}"] = tuple(domains[v])
            candidates = f"_D{i}"
        checks: list[Check] = []
        for _, other, k, table in supports[1:]:
            namespace[f"_S{k}"] = {x: frozenset(ys) for x, ys in table.items()}
            checks.append(Check(f"{v} in _S{k}[{other}]", False))
        # Bounds of polynomial constraints (exact once complete); the others once complete.
        for k, c in enumerate(cons):
            if v not in c.names or len(c.names) < 3:
                continue
            keep = {n for n in c.names if pos[n] <= i}
            if c.forms:
                if keep != {v}:  # over v alone, propagation has enforced it already
                    checks += c.bound_checks(keep, v, lo, hi)
            elif keep == set(c.names) and c.code is not None:
                checks.append(Check(c.code, False))
            elif keep == set(c.names):
                namespace[f"_F{k}"] = c.exact(order[: i + 1], space)
                checks.append(Check(f"_F{k}({', '.join(order[: i + 1])})", False))
        # Bounds linear in v slice the (ascending) candidates; the rest are tested value by value,
        # those that can end the loop first.
        lower = [check.cut[1] for check in checks if check.cut and check.cut[0] == "lower"]
        upper = [check.cut[1] for check in checks if check.cut and check.cut[0] == "upper"]
        if lower or upper:
            def bound(cuts: list[str], pick: str) -> str:
                return cuts[0] if len(cuts) == 1 else f"{pick}({', '.join(cuts)})"
            start = f"_bl({candidates}, {bound(lower, 'max')})" if lower else ""
            stop = f"_br({candidates}, {bound(upper, 'min')})" if upper else ""
            candidates = f"{candidates}[{start}:{stop}]"
        tests = sorted(((check.code, check.ends) for check in checks if not check.cut), key=lambda t: not t[1])
        levels.append((v, candidates, tests))

    row = f"({', '.join(space.names)},)"
    fused = min(_FUSED_LEVELS, len(order)) if limit is None else 0
    functions: list[list[str]] = []
    depth = 0  # loops open in the current function

    def emit(line: str) -> None:
        functions[-1].append("    " * (depth + 1) + line)

    for i, (v, candidates, tests) in enumerate(levels):
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
        for code, ends in tests:
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
        names=names, rows=found, space_size=space.size, valid=len(found), seconds=time.perf_counter() - start,
        pruned_by_propagation=0, nodes=space.size, complete=complete, order=names,
        domains={v.name: v.domain for v in space.variables})
