"""The pass protocol, the registry and the presets: passes are found by name, presets are data.

A pass declares (:class:`Pass`): its ``name``; whether it is ``exact`` (never changes results beyond
float rounding); a one-line ``description``; the ``options`` it reads, each an :class:`Option` with
its type, default and meaning; and ``run(program, ctx) -> bool`` (whether it changed the program).
A lossy pass that proposes actions to the budget's allocator instead of rewriting by itself is a
:class:`LossyPass`: it also has ``candidates(program, ctx)``. Pass modules register themselves with
:func:`register`; the core never imports a pass by name.

Options are typed and declared (TVM's ``PassContext`` config keys): :func:`check_options` rejects a
name no pass declares, with the closest declared one, and a value of the wrong type; a pass reads
its options with ``ctx.option(name)`` and gets the declared default.

Pass order is data too: :data:`PRESETS` name passes in order, and :data:`BACKEND_STEPS` say where the
steps a backend adds (``tvm_kernels`` for ``backend="tvm"``) join any pass list, a preset's or the user's.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import UnknownOptionError, UnknownPassError


@dataclass(frozen=True)
class Option:
    """One option a pass (or the pipeline) reads from ``optimize(..., options={name: value})``."""

    name: str
    type: type | tuple[type, ...]  # what a value must be (an int is accepted where a float is declared)
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None  # the values allowed, when they are few

    @property
    def types(self) -> tuple[type, ...]:
        """The declared type(s) as a tuple."""
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def check(self, value: Any) -> Any:
        """``value`` when it fits this option, else an :class:`UnknownOptionError` saying what would."""
        if value is None and self.default is None:
            return value  # unset, as when not given
        types = (*self.types, int) if float in self.types else self.types
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise UnknownOptionError(f"option {self.name!r} takes {want} ({self.help}); got {value!r}.")
        if self.choices is not None and value not in self.choices:
            raise UnknownOptionError(f"option {self.name!r} takes one of {', '.join(map(repr, self.choices))}; "
                                     f"got {value!r}.")
        return value


@runtime_checkable
class Pass(Protocol):
    name: str
    exact: bool
    description: str
    options: tuple[Option, ...]

    def run(self, program: Any, ctx: Any) -> bool: ...


@runtime_checkable
class LossyPass(Pass, Protocol):
    """A lossy pass that proposes actions (``optic.budget.Action``) for the allocator to choose from."""

    def candidates(self, program: Any, ctx: Any) -> list[Any]: ...


def proposes(p: Any) -> bool:
    """Whether ``p`` is a lossy pass whose actions the allocator chooses (else it rewrites by itself)."""
    return not p.exact and callable(getattr(type(p), "candidates", None))


# the pipeline's own options (every pass's are declared on the pass)
PIPELINE_OPTIONS: tuple[Option, ...] = (
    Option("budget_stage_share", float, 0.5, "share of the unspent accuracy budget a lossy stage may use when "
           "another lossy stage follows"),
    Option("budget_measure_s", float, 0.6, "seconds the allocator spends timing each candidate set"),
    Option("final_measure_s", float, 2.0, "seconds spent timing the result against the captured model at the "
           "end (the result is never slower)"),
)

_PASSES: dict[str, Pass] = {}

# Presets name passes in order. "exact" is the default; budgeted lossy passes join "default" later.
PRESETS: dict[str, list[str]] = {
    "exact": ["cleanup", "fold_norm", "fuse", "cleanup", "cpu_tactics"],
    # lossy passes run only with budget= (otherwise they are skipped and "default" is "exact");
    # they see the graph before the CPU tactics rewrite ops into oneDNN kernels, and early exit,
    # which splits the graph into segments, comes last. quantize (int8 on CPUs) and precision (bf16/fp16 on
    # GPUs) are a budget stage of their own after the structural ones, so that a layer they factored or
    # pruned can also run in lower precision
    "default": ["cleanup", "fold_norm", "fuse", "cleanup", "lowrank", "prune", "sparse24", "cleanup",
                "quantize", "precision", "cpu_tactics", "early_exit"],
    "none": [],
}


@dataclass(frozen=True)
class BackendStep:
    """A step a backend adds to every pass list (a preset's or the user's): before the first of ``before``
    that the list holds (in that order of preference), else at the end; only on targets of the ``kinds``
    given; never twice."""

    name: str
    before: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("cpu", "gpu")


# What each backend adds to the pass list, and where (the presets above are the torch backend's lists).
BACKEND_STEPS: dict[str, tuple[BackendStep, ...]] = {
    # on a GPU target: how the whole graph the passes leave runs on the device (measured there), before early
    # exit, which splits the graph (and again after it when it changed nothing, as cpu_tactics)
    "torch": (BackendStep("gpu_tactics", before=("early_exit",), kinds=("gpu",)),),
    # generated kernels go before the oneDNN tactics, which take the layers they leave, else before early
    # exit, which splits the graph; on a GPU target the kernels are generated after the passes, into an
    # artifact (optic.backend.artifact), so no step joins the list there
    "tvm": (BackendStep("tvm_kernels", before=("cpu_tactics", "early_exit"), kinds=("cpu",)),
            BackendStep("gpu_tactics", before=("early_exit",), kinds=("gpu",))),
}


def with_backend(passes: list[Pass], backend: str, target_kind: str) -> list[Pass]:
    """``passes`` with the steps of ``backend`` (:data:`BACKEND_STEPS`) for a target of ``target_kind``."""
    out = list(passes)
    for step in BACKEND_STEPS[backend]:
        names = [p.name for p in out]
        if target_kind not in step.kinds or step.name in names:
            continue
        at = next((names.index(b) for b in step.before if b in names), len(names))
        out.insert(at, get(step.name))
    return out


def register(p: Any) -> Any:
    """Class or instance decorator: add a pass to the registry under ``p.name``.

    The pass must declare the protocol (:class:`Pass`): a pass without ``options`` or ``description``
    is an error here, at import, not a surprise in a user's run."""
    inst = p() if isinstance(p, type) else p
    missing = [a for a in ("name", "exact", "description", "options", "run") if not hasattr(inst, a)]
    if missing:
        raise TypeError(f"pass {getattr(inst, 'name', inst)!r} does not declare {', '.join(missing)} "
                        "(optic.pipeline.registry.Pass)")
    for o in inst.options:
        if not isinstance(o, Option):
            raise TypeError(f"pass {inst.name!r}: option {o!r} is not an optic.pipeline.registry.Option")
    _PASSES[inst.name] = inst
    return p


def declared_options() -> dict[str, Option]:
    """Every option any registered pass (or the pipeline) declares, by name. Two passes that read the
    same option declare it alike (tests/pipeline/test_options.py checks)."""
    _load()
    out = {o.name: o for o in PIPELINE_OPTIONS}
    for p in _PASSES.values():
        out.update({o.name: o for o in p.options})
    return out


def check_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` checked against the declarations: an unknown name is an error naming the closest
    declared one, a value of the wrong type an error naming the type."""
    known = declared_options()
    for name, value in (options or {}).items():
        if name not in known:
            close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownOptionError(f"unknown option {name!r}.{hint} Options: {', '.join(sorted(known))} "
                                     "(`optic passes` lists what each one does).")
        known[name].check(value)
    return dict(options or {})


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
