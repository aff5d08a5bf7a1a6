"""The original model's call contract, kept by the optimized module.

A captured graph takes the inputs of the example call and returns what tracing made of the
output. Users call the result as they called their model, so two things are kept here:

- **Arguments** (:class:`CallSignature`): a call is bound to the original ``forward``'s signature and
  laid out as the example was (positional stays positional, keywords stay keywords, whichever way the
  caller spelled them). An argument left out of the example was fixed to its default when the graph
  was captured: passing another value raises :class:`InputMismatchError` naming it, never a silently
  ignored input. An argument that was in the example must be passed on every call. Graphs captured
  with torch.export are specialized to the example's shapes, dtypes and Python values; a call that
  differs is refused, naming the argument.
- **Outputs** (:func:`flatten`, :class:`Structure`): any pytree (tuples, lists, dicts, named tuples,
  Hugging Face ``ModelOutput``) plus dataclasses that nobody registered with torch's pytree, flattened
  to leaves and rebuilt into the original's types.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import InputMismatchError

_MISSING = inspect.Parameter.empty


# -- outputs ----------------------------------------------------------------------------------
def _opaque_dataclass(obj: Any) -> bool:
    """A dataclass instance torch's pytree does not know (it would be one leaf)."""
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and type(obj) not in pytree.SUPPORTED_NODES


@dataclass(frozen=True)
class Structure:
    """The shape of a model output: a pytree spec whose dataclass leaves are opened field by field."""

    tree: pytree.TreeSpec
    # per leaf of ``tree``: None (a value), or (dataclass type, field names, Structure of the fields, leaf count)
    parts: tuple

    def rebuild(self, leaves: list) -> Any:
        top, i = [], 0
        for part in self.parts:
            if part is None:
                top.append(leaves[i])
                i += 1
                continue
            cls, names, sub, n = part
            obj = cls.__new__(cls)  # the values are computed: no __init__ / __post_init__ to re-run
            for name, value in zip(names, sub.rebuild(leaves[i:i + n]), strict=True):
                object.__setattr__(obj, name, value)
            top.append(obj)
            i += n
        return pytree.tree_unflatten(top, self.tree)


def flatten(obj: Any) -> tuple[list, Structure]:
    """The leaves of a model output (tensors and plain values) and the structure that rebuilds it."""
    top, tree = pytree.tree_flatten(obj, is_leaf=_opaque_dataclass)
    leaves: list = []
    parts: list = []
    for item in top:
        if _opaque_dataclass(item):
            names = tuple(f.name for f in dataclasses.fields(item))
            sub_leaves, sub = flatten([getattr(item, n) for n in names])
            parts.append((type(item), names, sub, len(sub_leaves)))
            leaves += sub_leaves
        else:
            parts.append(None)
            leaves.append(item)
    return leaves, Structure(tree, tuple(parts))


# -- arguments --------------------------------------------------------------------------------
def equal_values(a: Any, b: Any) -> bool:
    """``a == b`` as a truth value; identity for values whose ``==`` is not one."""
    try:
        return bool(a == b)
    except Exception:
        return a is b


def _same(a: Any, b: Any) -> bool:
    """The same Python value (tensors: the same object)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False
    return equal_values(a, b)


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor {list(v.shape)}:{str(v.dtype).replace('torch.', '')}"
    leaves = pytree.tree_leaves(v)
    if any(isinstance(t, torch.Tensor) for t in leaves) and not isinstance(v, torch.Tensor):
        return f"a {type(v).__name__} of {len(leaves)} value(s)"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class CallSignature:
    """How a call of the original ``forward`` maps onto the captured graph's inputs."""

    def __init__(self, forward: Any, args: tuple, kwargs: dict, specialized: bool, dims: Any = None):
        self.specialized = specialized  # torch.export: shapes (but its dynamic dims), dtypes and values are fixed
        self.dims = dims  # optic.ir.dynamic.Dims of the flat inputs: the sizes that may vary, and their ranges
        self.n_args, self.kw_names = len(args), tuple(kwargs)
        try:
            self.sig: inspect.Signature | None = inspect.signature(forward)
            self.example = self._named(self.sig.bind(*args, **kwargs))
        except (TypeError, ValueError):  # no signature to bind to: calls pass through as they come
            self.sig, self.example = None, {}
        self.pos_keys = list(self.example)[:self.n_args]
        self.kw_keys = [k for k in self.example if k not in self.pos_keys]
        self._fast = not self.kw_names and self.sig is not None and all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in list(self.sig.parameters.values())[:self.n_args])
        if specialized:
            self.example_leaves = {k: self._leaf_sig(v) for k, v in self.example.items()}
            # where each argument's leaves start among the graph's flat inputs (the example call's order)
            self.flat_start: dict[Any, int] = {}
            i = 0
            for key in [*self.pos_keys, *kwargs]:
                if key in self.example:
                    self.flat_start[key] = i
                    i += len(pytree.tree_leaves(self.example[key]))

    def _named(self, bound: inspect.BoundArguments) -> dict[Any, Any]:
        """Bound arguments keyed by parameter name, ``*args`` items by (name, i), ``**kwargs`` items by name."""
        out: dict[Any, Any] = {}
        for name, value in bound.arguments.items():
            kind = self.sig.parameters[name].kind
            if kind == inspect.Parameter.VAR_POSITIONAL:
                out.update({(name, i): v for i, v in enumerate(value)})
            elif kind == inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    def _default(self, key: Any) -> Any:
        p = self.sig.parameters.get(key) if isinstance(key, str) else None
        return _MISSING if p is None else p.default

    def arrange(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call laid out as the example was; raises :class:`InputMismatchError` for a call the graph
        cannot compute (an argument it was not captured with, or one it needs left out)."""
        if self.sig is None:
            return args, kwargs
        if self._fast and not kwargs and len(args) == self.n_args:
            named = dict(zip(self.pos_keys, args, strict=True))
        else:
            try:
                named = self._named(self.sig.bind(*args, **kwargs))
            except TypeError as e:
                raise InputMismatchError(f"the call does not match the original forward{self.sig}: {e}") from None
            for key, value in named.items():
                if key not in self.example and not _same(value, self._default(key)):
                    default = self._default(key)
                    fixed = "without it" if default is _MISSING else f"with {key}={default!r}"
                    raise InputMismatchError(
                        f"argument {_key_name(key)} was not part of the example inputs, so the graph was captured "
                        f"{fixed}; this call passes {_describe(value)}. Pass it in the example inputs "
                        f"of optic.optimize (e.g. example_kwargs={{{_key_name(key)}: ...}}) to optimize calls "
                        "that use it.")
            for key in self.example:
                if key not in named:
                    default = self._default(key)
                    if default is not _MISSING and _same(default, self.example[key]):
                        named[key] = default
                        continue
                    raise InputMismatchError(
                        f"argument {_key_name(key)} was part of the example inputs, so the optimized graph takes "
                        f"it as an input; this call leaves it out. Pass it on every call, or optimize again with "
                        "example inputs that leave it out.")
        if self.specialized:
            self._check_specialized(named)
        return tuple(named[k] for k in self.pos_keys), {k: named[k] for k in self.kw_keys}

    @staticmethod
    def _leaf_sig(value: Any) -> list:
        return [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else ("value", t)
                for t in pytree.tree_leaves(value)]

    def _check_specialized(self, named: dict) -> None:
        for key, want in self.example_leaves.items():
            got = self._leaf_sig(named[key])
            if len(got) == len(want) and all(self._leaf_ok(key, j, g, w) for j, (g, w) in enumerate(zip(got, want, strict=True))):
                continue
            dims = self.dims.describe() if self.dims else ""
            raise InputMismatchError(
                f"argument {_key_name(key)}: this module was captured with torch.export and is specialized to "
                f"{_describe_leaves(want)}{' except its dynamic dimensions (' + dims + ')' if dims else ''}; "
                f"this call passes {_describe_leaves(got)}. Call optic.optimize again with example inputs like the "
                "ones you will use, or name the dimensions that vary: optimize(..., dynamic={'<argument>': "
                "{<dim>: '<name>'}}).")
        if self.dims:
            self._check_same_sizes(named)

    def _check_same_sizes(self, named: dict) -> None:
        """A dynamic dimension shared by several inputs (the batch of ``input_ids`` and ``attention_mask``) has
        one size per call."""
        seen: dict[str, tuple[int, str]] = {}
        for key, start in self.flat_start.items():
            for j, t in enumerate(pytree.tree_leaves(named[key])):
                for d, (name, _, _) in self.dims.per_input.get(start + j, {}).items():
                    size = int(t.shape[d])
                    if name in seen and seen[name][0] != size:
                        raise InputMismatchError(
                            f"dynamic dimension '{name}' has size {seen[name][0]} in {seen[name][1]} but {size} in "
                            f"dim {d} of {_key_name(key)}: inputs that share it must agree")
                    seen.setdefault(name, (size, f"dim {d} of {_key_name(key)}"))

    def _leaf_ok(self, key: Any, j: int, got: tuple, want: tuple) -> bool:
        if got[0] == "value" or want[0] == "value":
            return got[0] == want[0] and _same(got[1], want[1])
        if got == want:
            return True
        if got[1] != want[1] or len(got[0]) != len(want[0]) or not self.dims:
            return False
        i = self.flat_start.get(key, -1) + j
        return all(g == w or self.dims.allows(i, d, g) for d, (g, w) in enumerate(zip(got[0], want[0], strict=True)))


def _key_name(key: Any) -> str:
    return f"'{key}'" if isinstance(key, str) else f"'*{key[0]}[{key[1]}]'"


def _describe_leaves(sig: list) -> str:
    return ", ".join(repr(s[1]) if s[0] == "value" else f"{list(s[0])}:{str(s[1]).replace('torch.', '')}"
                     for s in sig) or "nothing"
