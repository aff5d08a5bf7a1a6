"""Dynamic dimensions: which input sizes one optimized module serves.

A graph captured with ``torch.export`` is specialized to the example's shapes unless export is told which
dimensions vary. optic asks for a dynamic **batch** (dimension 0 of every tensor input whose first size is
the example's batch) by default, and for any other dimension the user names (``dynamic={"input_ids":
{1: "seq"}}`` or a :class:`torch.export.Dim`). Export proves the graph right for the whole range (it refuses
a dimension the model's code specializes) and reports the range it inferred; the optimized module then
checks every call against those ranges, and the pipeline verifies every pass on an input of another size
too, so a pass or a kernel that baked in the example's size is rolled back instead of computing something
wrong at another size.

Two details of export shape the capture:

- a size of 1 (or 0) in the example is specialized by export whatever it is told, so the graph is traced
  on a copy of the example with that dimension doubled (the example's values repeated: export reads shapes,
  not values) and the range still starts at 1;
- a dimension export cannot keep dynamic (the model's code needs its value) falls back to the example's
  size, and the report says why.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import device
from ..errors import OpticError
from ..pipeline.verify import memory_format_of

BATCH = "batch"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Request:
    """What the user asked for: ``batch`` (dimension 0 of the batched inputs) and named dimensions per
    argument name: ``{arg: {dim: (name, min, max)}}`` (min/max None: inferred by export)."""

    batch: bool = True
    named: dict = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return self.batch or bool(self.named)


def request(dynamic: Any) -> Request:
    """Parse ``optimize(dynamic=...)``: ``"auto"``/``True`` (a dynamic batch), ``False``/``None`` (static),
    or a dict ``{argument name: {dimension: name | torch.export.Dim}}`` (the batch stays dynamic unless the
    dict says ``"batch": False``)."""
    if dynamic in ("auto", True):
        return Request(True)
    if dynamic is False or dynamic is None:
        return Request(False)
    if not isinstance(dynamic, dict):
        raise OpticError(f"dynamic must be 'auto', True, False or a dict like {{'input_ids': {{1: 'seq'}}}} "
                         f"(argument name -> {{dimension: name or torch.export.Dim}}); got {dynamic!r}")
    batch, named = True, {}
    for arg, dims in dynamic.items():
        if arg == BATCH and isinstance(dims, bool):
            batch = dims
            continue
        if not isinstance(arg, str) or not isinstance(dims, dict):
            raise OpticError(f"dynamic={dynamic!r}: each entry maps an argument name to {{dimension: name}}, "
                             f"e.g. {{'input_ids': {{1: 'seq'}}}}; got {arg!r}: {dims!r}")
        named[arg] = {}
        for d, spec in dims.items():
            if not isinstance(d, int) or isinstance(d, bool):
                raise OpticError(f"dynamic[{arg!r}]: dimension {d!r} is not an int")
            if isinstance(spec, str):
                name, lo, hi = spec, None, None
            elif type(spec).__name__ in ("Dim", "_Dim") or hasattr(spec, "__name__") and hasattr(spec, "min"):
                name, lo, hi = spec.__name__, getattr(spec, "min", None), getattr(spec, "max", None)
                hi = None if hi is None or hi >= 2 ** 62 or not math.isfinite(float(hi)) else int(hi)
                lo = None if lo is None or lo <= 0 else int(lo)
            else:
                raise OpticError(f"dynamic[{arg!r}][{d}]: give a name (e.g. 'seq') or a torch.export.Dim; "
                                 f"got {spec!r}")
            if not _NAME.match(name):
                raise OpticError(f"dynamic[{arg!r}][{d}]: {name!r} is not a valid dimension name (an identifier)")
            named[arg][d] = (name, lo, hi)
    return Request(batch, named)


@dataclass
class Dims:
    """The dynamic dimensions of a captured graph's flat inputs: per flat input index, ``{dim: (name, lo,
    hi)}`` (``hi`` None: unbounded). Empty: every shape is the example's."""

    per_input: dict[int, dict[int, tuple[str, int, int | None]]] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)  # a name per flat input (its argument), for messages

    def __bool__(self) -> bool:
        return bool(self.per_input)

    def names(self) -> dict[str, tuple[int, int | None]]:
        out: dict[str, tuple[int, int | None]] = {}
        for dims in self.per_input.values():
            for name, lo, hi in dims.values():
                out[name] = (lo, hi)
        return out

    def describe(self, input_names: list[str] | None = None) -> str:
        """``batch (dim 0 of input_ids, attention_mask): 1..∞; seq (dim 1 of input_ids): 1..512``."""
        input_names = input_names or self.labels
        where: dict[str, list[str]] = {}
        rng: dict[str, str] = {}
        for i, dims in sorted(self.per_input.items()):
            label = input_names[i] if input_names and i < len(input_names) else f"input {i}"
            for d, (name, lo, hi) in sorted(dims.items()):
                where.setdefault(name, []).append(f"dim {d} of {label}")
                rng[name] = f"{lo}..{'∞' if hi is None else hi}"
        return "; ".join(f"{n} ({', '.join(w)}): {rng[n]}" for n, w in where.items())

    def allows(self, i: int, d: int, size: int) -> bool:
        spec = self.per_input.get(i, {}).get(d)
        return spec is not None and spec[1] <= size and (spec[2] is None or size <= spec[2])


def batch_size(leaves: list) -> int | None:
    sizes = [t.shape[0] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0]
    return int(sizes[0]) if sizes else None


def export_spec(forward: Any, args: tuple, kwargs: dict, req: Request) -> tuple[Any, tuple, dict, dict, list]:
    """``dynamic_shapes`` for ``torch.export.export`` and the inputs to trace with (a size 0/1 dynamic
    dimension doubled), plus ``{name: (lo, hi)}`` declared and, per flat input, its ``{dim: Dim}`` (or None). Raises OpticError for a request that names an
    argument or dimension the call does not have."""
    sig = inspect.signature(forward)
    bound = sig.bind(*args, **kwargs)
    leaves = pytree.tree_leaves((args, kwargs))
    batch = batch_size(leaves) if req.batch else None
    for arg, dims in req.named.items():
        if arg not in bound.arguments:
            raise OpticError(f"dynamic names argument {arg!r}, which the example call does not pass; the call's "
                             f"arguments are {list(bound.arguments)}")
        for d in dims:
            t = bound.arguments[arg]
            if not isinstance(t, torch.Tensor) or not -t.dim() <= d < t.dim():
                raise OpticError(f"dynamic[{arg!r}]: the example's {arg!r} has no dimension {d} "
                                 f"({_describe(t)})")
    dims: dict[str, Any] = {}
    declared: dict[str, tuple[int, int | None]] = {}

    def dim(name: str, lo: int | None, hi: int | None) -> Any:
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=1 if lo is None else lo, max=hi) if hi is not None else \
                torch.export.Dim(name, min=1 if lo is None else lo)
            declared[name] = (1 if lo is None else lo, hi)
        return dims[name]

    grow: dict[int, set[int]] = {}  # id(tensor) -> dims to double for tracing

    def spec_for(arg: str, value: Any) -> Any:
        named = req.named.get(arg, {})

        def one(t: Any) -> Any:
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                return None
            out = {}
            if batch is not None and t.shape[0] == batch and 0 not in named:
                out[0] = dim(BATCH, None, None)
            for d, (name, lo, hi) in named.items():
                out[d % t.dim()] = dim(name, lo, hi)
            for d in out:
                if t.shape[d] < 2:
                    grow.setdefault(id(t), set()).add(d)
            return out or None

        return pytree.tree_map(one, value)

    # per argument: the spec torch.export takes (keyed by parameter name); per flat input: its dims
    specs = {name: _per_arg(sig, name, value, spec_for) for name, value in bound.arguments.items()}
    leaf_specs: list = []
    for j, a in enumerate(args):
        leaf_specs += _spec_leaves(spec_for(_positional_name(sig, j), a), a)
    for k, v in kwargs.items():
        leaf_specs += _spec_leaves(spec_for(k, v), v)

    def grown(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or id(t) not in grow:
            return t
        for d in sorted(grow[id(t)]):
            if t.shape[d] == 0:
                raise OpticError(f"a dynamic dimension has size 0 in the example ({_describe(t)}): give an "
                                 "example with at least one element along it")
        return doubled(t, sorted(grow[id(t)]))

    t_args, t_kwargs = pytree.tree_map(grown, (args, kwargs)) if grow else (args, kwargs)
    return specs, t_args, t_kwargs, declared, leaf_specs


def doubled(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """``t`` repeated once along each of ``dims``: a size-1 dimension export can trace as dynamic."""
    for d in dims:
        t = torch.cat([t, t], dim=d)
    return t


def _per_arg(sig: inspect.Signature, name: str, value: Any, spec_for: Any) -> Any:
    kind = sig.parameters[name].kind
    if kind == inspect.Parameter.VAR_KEYWORD:
        return {k: spec_for(k, v) for k, v in value.items()}
    if kind == inspect.Parameter.VAR_POSITIONAL:
        return tuple(spec_for(name, v) for v in value)
    return spec_for(name, value)


def _positional_name(sig: inspect.Signature, j: int) -> str:
    params = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.KEYWORD_ONLY]
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if j < len(fixed):
        return fixed[j].name
    var = [p for p in params if p.kind == p.VAR_POSITIONAL]
    return var[0].name if var else f"arg{j}"


def _spec_leaves(spec: Any, value: Any) -> list:
    """The per-tensor specs of ``spec`` (built by mapping over ``value``) in ``value``'s leaf order."""
    n = len(pytree.tree_leaves(value))
    found = pytree.tree_leaves(spec, is_leaf=lambda s: s is None or (isinstance(s, dict) and all(
        isinstance(k, int) for k in s)))
    return found if len(found) == n else [None] * n


def read_dims(gm: torch.fx.GraphModule, ranges: dict) -> Dims:
    """The dynamic dimensions of an exported graph's flat inputs, with the ranges export proved: each
    placeholder's symbolic sizes, named by the dimension they were declared as where export kept it."""
    out = Dims()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                vr = ranges.get(expr)
                lo = int(vr.lower) if vr is not None else 1
                hi = vr.upper if vr is not None else None
                hi = None if hi is None or not _finite(hi) else int(hi)
                out.per_input.setdefault(i, {})[d] = (str(expr), max(lo, 0), hi)
    return out


def name_dims(found: Dims, declared: dict[str, tuple[int, int | None]], spec_leaves: list) -> Dims:
    """``found`` with each symbol renamed to the dimension declared at that place (export names its own
    symbols ``s0``, ``s77``...). The range is export's, within the declared one (export's starts higher where
    the model's code needs it, e.g. a branch on ``size == 1``)."""
    out = Dims()
    for i, dims in found.per_input.items():
        names = spec_leaves[i] if i < len(spec_leaves) and isinstance(spec_leaves[i], dict) else {}
        for d, (sym, lo, hi) in dims.items():
            label = names[d].__name__ if d in names else sym
            dlo, dhi = declared.get(label, (lo, hi))
            out.per_input.setdefault(i, {})[d] = (label, max(lo, dlo), hi if hi is not None else dhi)
    return out


def outside(leaves: list, dims: Dims) -> str | None:
    """The first example size outside its dimension's range, described, or None."""
    for i, dd in dims.per_input.items():
        for d, (name, lo, hi) in dd.items():
            n = int(leaves[i].shape[d])
            if n < lo or (hi is not None and n > hi):
                return f"the model's code needs {name} in {lo}..{'∞' if hi is None else hi}, the example has {n}"
    return None


def resized(leaves: list, dims: Dims) -> list[dict[int, dict[int, int]]]:
    """Other sizes for the dynamic dimensions, each within its range: ``[{flat index: {dim: size}}]``. First a
    size next to the example's (1 → 3; n → n + 1), which catches a kernel specialized to the example's
    size; then the smallest size (1) where the example's is larger, where broadcasting rules differ from
    those export traced with (it assumes sizes of at least 2)."""
    out = []
    for pick in (_next_size, _smallest_size):
        chosen: dict[str, int] = {}
        for i, dd in dims.per_input.items():
            for d, (name, lo, hi) in dd.items():
                n = int(leaves[i].shape[d])
                size = pick(n, lo, hi)
                if name not in chosen and size is not None:
                    chosen[name] = size
        if chosen:
            out.append({i: {d: chosen[spec[0]] for d, spec in dd.items() if spec[0] in chosen}
                        for i, dd in dims.per_input.items()})
    return out


def _next_size(n: int, lo: int, hi: int | None) -> int | None:
    return next((c for c in ((3, 2) if n == 1 else (n + 1, n - 1, n + 2))
                 if c != n and lo <= c and (hi is None or c <= hi)), None)


def _smallest_size(n: int, lo: int, hi: int | None) -> int | None:
    return 1 if lo <= 1 and n > 2 else None


def resize_inputs(args: tuple, kwargs: dict, sizes: dict[int, dict[int, int]], seed: int = 0) -> tuple[tuple, dict]:
    """The example call with the dynamic dimensions at ``sizes``: the example's values tiled (then cut) along
    each, so token ids stay valid ids and masks stay masks; float values get a small seeded change so the
    copies are not exact repeats."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, t in enumerate(flat):
        if i in sizes and isinstance(t, torch.Tensor):
            for d, n in sizes[i].items():
                reps = -(-n // t.shape[d])
                t = torch.cat([t] * reps, dim=d).narrow(d, 0, n)
            if t.is_floating_point():
                scale = t.float().std().item() if t.numel() > 1 else 1.0
                scale = scale if scale == scale and scale > 0 else 1.0
                t = (t + 0.1 * scale * device.randn(t.shape, gen, like=t)).contiguous(
                    memory_format=memory_format_of(t))
            else:
                t = t.contiguous()
        out.append(t)
    new_args, new_kwargs = pytree.tree_unflatten(out, spec)
    return tuple(new_args), dict(new_kwargs)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError, OverflowError):
        return False


def _describe(t: Any) -> str:
    return f"shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
