"""The pass registry and presets: passes are found by name, presets are data.

A pass is an object with ``name``, ``exact`` (never changes results beyond float rounding) and
``run(program, ctx) -> bool`` (whether it changed the program). Pass modules register themselves
with :func:`register`; the core never imports a pass by name.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

from .errors import UnknownPassError


class Pass(Protocol):
    name: str
    exact: bool
    description: str

    def run(self, program: Any, ctx: Any) -> bool: ...


_PASSES: dict[str, Pass] = {}

# Presets name passes in order. "exact" is the default; budgeted lossy passes join "default" later.
PRESETS: dict[str, list[str]] = {
    "exact": ["cleanup", "fold_norm", "fuse", "cleanup", "cpu_tactics"],
    # lossy passes run only with budget= (otherwise they are skipped and "default" is "exact");
    # they see the graph before the CPU tactics rewrite ops into oneDNN kernels, and early exit,
    # which splits the graph into segments, comes last. quantize is a budget stage of its own after the
    # structural ones, so that a layer they factored or pruned can also run in int8
    "default": ["cleanup", "fold_norm", "fuse", "cleanup", "lowrank", "prune", "sparse24", "cleanup",
                "quantize", "cpu_tactics", "early_exit"],
    "none": [],
}


def register(p: Any) -> Any:
    """Class or instance decorator: add a pass to the registry under ``p.name``."""
    inst = p() if isinstance(p, type) else p
    _PASSES[inst.name] = inst
    return p


def _load() -> None:
    importlib.import_module("optic.passes")  # the graph rewrites
    importlib.import_module("optic.backend")  # the steps that choose kernels (oneDNN tactics, generated code)


def get(name: str) -> Pass:
    _load()
    if name not in _PASSES:
        raise UnknownPassError(name, list(_PASSES) + list(PRESETS))
    return _PASSES[name]


def names() -> list[str]:
    _load()
    return sorted(_PASSES)


def resolve(spec: str | list[Any] | tuple) -> list[Pass]:
    """A preset name, a pass name, or a list of pass names / pass objects -> pass objects."""
    _load()
    if isinstance(spec, str):
        if spec in PRESETS:
            return [get(n) for n in PRESETS[spec]]
        if "," in spec:
            return resolve([s.strip() for s in spec.split(",") if s.strip()])
        return [get(spec)]
    out: list[Pass] = []
    for item in spec:
        if isinstance(item, str):
            out.extend(resolve(item))
        else:
            out.append(item)
    return out
