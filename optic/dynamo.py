"""optic as a ``torch.compile`` backend: ``torch.compile(model, backend="optic")``.

Dynamo runs the model's Python and hands each stretch of tensor code between graph breaks to
:func:`backend` as an fx graph. Data-dependent control flow (``if x.sum() > 0:``), which
``optic.optimize`` cannot capture, becomes a graph break: it runs in Python and the graphs around it are
optimized. The backend is registered under dynamo's ``torch_dynamo_backends`` entry point
(``pyproject.toml``), so ``backend="optic"`` works without ``import optic`` first.

For each graph:

1. **Freeze.** Dynamo lifts the module's parameters, buffers and tensor attributes to graph inputs, and
   with ``dynamic=True`` its float attributes too (BatchNorm's ``eps``, as 0-d tensors read with
   ``.item()``). optic's passes fold, fuse and prepack weights, so those become constants of a new graph
   (the floats Python numbers, which is what lets a BatchNorm fold); the other inputs stay inputs.
2. **Optimize** that graph with :func:`optic.optimize` (``capture="fx"``) and the arguments given as
   ``torch.compile(..., options={...})`` (:data:`OPTIONS`).
3. **Guard every call.** The frozen inputs must be the tensors that were frozen, unmodified (their
   ``_version``), and the floats the same values. A weight edited in place, loaded, or another instance of
   the same model class (dynamo shares graphs between them) is optimized again with the tensors of that
   call, up to :data:`MAX_OPTIMIZATIONS` times a graph; after that the graph runs as dynamo traced it.
   A result is never computed from stale weights.

Sizes (``dynamic=True``, or dynamo's automatic dynamic shapes on a recompile): the graph is optimized at
the sizes of its first call; the optimized fx graph keeps shape
computations live, but a kernel measured or packed at one size is not proven at another, so a graph with
symbolic sizes is checked against the traced graph on the first call at every new size (one extra run of
the traced graph per size) and runs as traced at a size where they disagree.

A graph runs as dynamo traced it, with a warning that names why, when optic cannot capture it
(:class:`optic.CaptureError`) or fails on it; when it needs gradients (grad mode on and an input or weight
requires grad: optic optimizes inference, so call the model under ``torch.no_grad()``); when it mutates
its inputs or the module's state (training-mode BatchNorm's running statistics); and, without a warning,
when it has no op optic can improve (:data:`WORTH_OPTIMIZING`).

Every graph's outcome, with optic's :class:`~optic.Report` when it was optimized, is in :func:`graphs`.
"""

from __future__ import annotations

import collections
import copy
import logging
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .api import optimize
from .errors import CaptureError, OpticError
from .ir.graph import live_tensors
from .ir.opview import kind_of
from .pipeline.report import Report
from .pipeline.verify import compare

log = logging.getLogger("optic.dynamo")

# torch.compile(..., options={...}): the keys optic reads, what they mean, forwarded to optic.optimize.
OPTIONS: dict[str, str] = {
    "target": "a target name or optic Target (default 'cpu': this machine, where the backend measures)",
    "passes": "a preset ('exact', the default) or a list of pass names",
    "backend": "'torch' (PyTorch's kernels, the default) or 'tvm' (generated kernels where faster)",
    "tolerance": "the largest error allowed relative to the output scale (default by dtype: 1e-4 for fp32)",
    "options": "pass options, e.g. {'tactics_budget_s': 5} or {'whole_graph': False}",
    "disable": "pass names to switch off",
    "measure": "whether passes may time candidates here (default: when the target is this machine's CPU)",
}

# A graph with none of these ops is left as dynamo traced it: optic's passes fold norms into, fuse and
# pick kernels for convolutions, linears, matmuls and attention, and without one of them there is
# nothing for them to do, while optimizing costs seconds (verification, measurement) and the result's
# call a few microseconds more. The small graphs graph breaks leave (``x.sum() > 0``) are such graphs.
WORTH_OPTIMIZING = frozenset({"conv", "linear", "matmul", "sdpa"})

# Optimizations of one graph (the first, then one each time the frozen weights change); after that the
# weights are taken to be changing on purpose (training) and the graph runs as traced.
MAX_OPTIMIZATIONS = 3

# The last graphs compiled in this process. Dynamo calls the backend with no handle back to the caller,
# so this record is the one place a user can see what happened to each graph; bounded.
_GRAPHS: collections.deque[GraphRecord] = collections.deque(maxlen=256)


@dataclass
class GraphRecord:
    """What the backend did with one graph dynamo handed over."""

    graph: str  # dynamo's compile id ("0/0": frame 0, first compile), and an optimization count after it
    ops: int  # op nodes in the graph dynamo traced
    report: Report | None = None  # optic's report, when optic optimized the graph
    traced: str | None = None  # why the graph runs as dynamo traced it (None: it runs optic's result)

    def __str__(self) -> str:
        if self.report is None:
            return f"graph {self.graph} ({self.ops} ops): runs as traced: {self.traced}"
        return f"graph {self.graph} ({self.ops} ops): {summary(self.report)}"


def graphs() -> list[GraphRecord]:
    """The graphs compiled with ``backend="optic"`` in this process, oldest first (the last 256)."""
    return list(_GRAPHS)


def clear() -> None:
    """Forget the recorded graphs (what :func:`graphs` returns)."""
    _GRAPHS.clear()


def summary(report: Report) -> str:
    """One line: what optic changed in a graph and what it measured."""
    changed = [p.name for p in report.passes if p.changed and not p.rolled_back]
    line = (f"{report.nodes[0]}→{report.nodes[1]} ops; passes that changed it: {', '.join(changed) or 'none'}; "
            f"max error {report.final_error:.1e}")
    if report.measured_latency_s:
        line += "; " + report.measured_line()
    return line


def backend(gm: fx.GraphModule, example_inputs: list[Any], *, options: dict[str, Any] | None = None,
            mode: str | None = None) -> Callable[..., Any]:
    """The ``torch.compile`` backend: ``torch.compile(model, backend="optic", options={...})``.

    Dynamo calls it once per graph with the graph and the values of its inputs; it returns the callable
    dynamo runs instead. ``options`` keys are :data:`OPTIONS`; an unknown key is an error. optic
    optimizes a graph on its first call, not here: dynamo is still tracing the frame here, and optic's
    own compiles and exports (the whole-graph step) must not run inside that.
    """
    if mode is not None:
        raise OpticError(f"the optic backend has no modes (got mode={mode!r}); pass optic's arguments as "
                         f"options={{...}} with keys {', '.join(OPTIONS)}")
    settings = dict(options or {})
    unknown = sorted(set(settings) - set(OPTIONS))
    if unknown:
        raise OpticError(f"unknown option(s) {', '.join(map(repr, unknown))} for backend='optic'; its options are "
                         + "; ".join(f"{k!r}: {v}" for k, v in OPTIONS.items()))
    placeholders = _placeholders(gm)
    ops = sum(n.op in ("call_function", "call_method", "call_module") for n in gm.graph.nodes)
    record = GraphRecord(str(gm.meta.get("dynamo_compile_id", len(_GRAPHS))), ops)
    _GRAPHS.append(record)
    if not {kind_of(n, gm) for n in gm.graph.nodes} & WORTH_OPTIMIZING:
        record.traced = f"no {', '.join(sorted(WORTH_OPTIMIZING))} op for optic to improve"
        log.info("optic: %s", record)
        return gm.forward
    if _needs_grad(example_inputs):
        return _traced(gm, record, _GRAD)
    training = [name for name, m in gm.named_modules() if m is not gm and m.training]
    if training:  # modules kept as modules (torch before 2.13 with inline_inbuilt_nn_modules=False) update state
        return _traced(gm, record, f"module '{training[0]}' is in training mode: call model.eval() for inference")
    roles = [_role(node, value) for node, value in zip(placeholders, example_inputs, strict=True)]
    dynamic = any(isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool) for v in example_inputs) \
        or any(_symbolic(n) for n in placeholders)
    return _OpticGraph(gm, roles, settings, record, dynamic)


_GRAD = ("grad mode is on and the graph's inputs or weights require grad, and optic optimizes inference: call "
         "the model under torch.no_grad() or torch.inference_mode()")


def _traced(gm: fx.GraphModule, record: GraphRecord, why: str) -> Callable[..., Any]:
    record.traced = why
    log.info("optic: %s", record)
    warnings.warn(f"optic (torch.compile backend): graph {record.graph} runs as dynamo traced it, unoptimized: "
                  f"{why}", stacklevel=2)
    return gm.forward


def _needs_grad(values: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _mutates(gm: fx.GraphModule, values: list[Any]) -> str | None:
    """Whether running ``gm`` writes into one of its inputs (the module's state included): run it once
    on copies and read their version counters. The optimized graph would write into its frozen copy, or
    not at all."""
    copies = [v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values]
    try:
        with torch.no_grad():
            gm(*copies)
    except Exception as e:  # not optic's to judge: dynamo's graph raises as it would have
        return f"the traced graph fails on copies of its inputs ({type(e).__name__}: {str(e).splitlines()[0]})"
    written = [n.target for n, c in zip(_placeholders(gm), copies, strict=True)
               if isinstance(c, torch.Tensor) and c._version != 0]
    if written:
        return (f"it writes into its inputs or the module's state ({', '.join(map(str, written[:3]))}), e.g. "
                "training-mode BatchNorm's running statistics: call model.eval() for inference")
    return None


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


# -- freezing -----------------------------------------------------------------------------------------
WEIGHT, SCALAR, INPUT = "weight", "scalar", "input"


def _role(node: fx.Node, value: Any) -> str:
    """``weight``: a tensor of the module (parameter, buffer, tensor attribute), frozen and checked by
    identity and version; ``scalar``: a float attribute of the module passed as a 0-d tensor, frozen and
    checked by value; ``input``: everything else (the model's inputs, sizes), kept as an input."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    of_module = source is not None and _module_source(source)
    if not isinstance(value, torch.Tensor) or _fake(value) or value.is_inference():
        return INPUT  # an inference tensor has no version counter: an edit could not be seen
    if of_module and getattr(arg, "pass_arg_as_tensor", False) and value.numel() == 1:
        return SCALAR
    if of_module or isinstance(value, nn.Parameter):
        return WEIGHT
    return INPUT


def _module_source(source: Any) -> bool:
    gs = source.guard_source
    gs = gs() if callable(gs) else gs
    return gs.is_specialized_nn_module() or gs.is_unspecialized_nn_module() or gs.is_fsdp_module()


def _fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def freeze(gm: fx.GraphModule, roles: list[str], values: list[Any], name: str) -> fx.GraphModule:
    """A copy of ``gm`` whose ``weight`` inputs are constants (the tensors in ``values``) and whose
    ``scalar`` inputs are Python numbers; the other inputs stay, in order."""
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph, class_name=f"DynamoGraph_{name.replace('/', '_').replace('#', '_')}")
    for i, (node, role, value) in enumerate(zip(_placeholders(out), roles, values, strict=True)):
        if role == INPUT:
            continue
        attr = f"frozen_{i}"
        if isinstance(value, nn.Parameter):
            out.register_parameter(attr, value)
        else:
            out.register_buffer(attr, value)
        with graph.inserting_after(node):
            const = graph.get_attr(attr)
        if role == SCALAR:  # ``eps.item()`` becomes the number itself: a BatchNorm can fold
            number = value.item()
            for user in [u for u in node.users if u.op == "call_method" and u.target == "item"]:
                for later in list(user.users):
                    later.args = fx.node.map_arg(later.args, lambda a, u=user, v=number: v if a is u else a)
                    later.kwargs = fx.node.map_arg(later.kwargs, lambda a, u=user, v=number: v if a is u else a)
                graph.erase_node(user)
        node.replace_all_uses_with(const)
        graph.erase_node(node)
        if not const.users:
            graph.erase_node(const)
    out.delete_all_unused_submodules()
    out.recompile()
    out.training = False  # the graph spells out training flags itself; its modules (if any) keep theirs
    return out


# -- the callable dynamo runs ---------------------------------------------------------------------------
@dataclass
class _Frozen:
    """One optimization of the graph: the weights and floats it froze, and optic's result."""

    weights: list[torch.Tensor]  # the call's inputs that were frozen
    versions: list[int]  # of ``weights`` and of the tensors the graph holds itself
    scalars: list[float]
    module: nn.Module
    checked: dict  # dynamic graphs: input sizes -> whether optic's result agreed with the traced graph there


class _OpticGraph:
    """What dynamo runs for one graph: optic's result while the frozen inputs are the ones it was
    optimized with; otherwise the graph optimized again, or run as traced."""

    def __init__(self, gm: fx.GraphModule, roles: list[str], settings: dict, record: GraphRecord, dynamic: bool):
        self.gm, self.roles, self.settings, self.record, self.dynamic = gm, roles, settings, record, dynamic
        self.weight_at = [i for i, r in enumerate(roles) if r == WEIGHT]
        self.scalar_at = [i for i, r in enumerate(roles) if r == SCALAR]
        self.input_at = [i for i, r in enumerate(roles) if r == INPUT]
        # tensors the graph holds itself (dynamo keeps some as attributes: torch before 2.13 without inlining)
        self.own = list(live_tensors(gm).values())
        self.states: list[_Frozen] = []
        self.optimizations = 0
        self.given_up: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.given_up is not None or _needs_grad(args):
            return self.gm(*args)
        state = self._state(args)
        if state is None:
            return self.gm(*args)
        inputs = [args[i] for i in self.input_at]
        if not self.dynamic:
            return state.module(*inputs)
        return self._checked(state, args, inputs)

    def _state(self, args: tuple) -> _Frozen | None:
        """The optimization made with this call's weights; optimized again when there is none."""
        weights = [args[i] for i in self.weight_at]  # list comprehensions: this runs on every call
        for state in self.states:
            if all(map(operator.is_, weights, state.weights)):
                if ([t._version for t in weights] + [t._version for t in self.own] == state.versions
                        and [args[i].item() for i in self.scalar_at] == state.scalars):
                    return state
                self.states.remove(state)  # edited in place or loaded: never run stale weights
                break
        if self.optimizations >= MAX_OPTIMIZATIONS:
            self._give_up(f"its weights changed after it was optimized {self.optimizations} times (editing or "
                          "training the model after compiling it); compile again (torch._dynamo.reset()) to "
                          "optimize the final weights")
            return None
        return self._optimize(args)

    def _optimize(self, args: tuple) -> _Frozen | None:
        """Freeze this call's weights and optimize; None when optic cannot (the graph then runs as traced)."""
        first = self.optimizations == 0
        self.optimizations += 1
        name = self.record.graph if first else f"{self.record.graph}#{self.optimizations}"
        try:
            # under torch.inference_mode() the inputs are inference tensors, which have no version counters:
            # optic works on ordinary copies (whatever it does with its examples stays off the caller's)
            with torch.inference_mode(False), torch.no_grad():
                values = [a.clone() if r == INPUT and isinstance(a, torch.Tensor) else a
                          for a, r in zip(args, self.roles, strict=True)]
                why = _mutates(self.gm, values) if first else None
                if why is None:
                    module = optimize(freeze(self.gm, self.roles, values, name),
                                      tuple(values[i] for i in self.input_at), capture="fx", inference=False,
                                      **self.settings)
        except CaptureError as e:
            why = f"optic cannot capture it: {str(e).splitlines()[0]}"
        except OpticError as e:
            if first:  # about the options (a target, pass or tolerance optic does not know): the user's to fix
                self.optimizations = 0
                raise
            why = f"optic cannot optimize it again: {str(e).splitlines()[0]}"
        except Exception as e:  # a bug in optic: the traced graph is right, and the warning says to report it
            log.debug("optic failed on graph %s", name, exc_info=True)
            why = f"optic failed on it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); please report it"
        if why is not None:
            self._give_up(why)
            return None
        record = self.record if first else GraphRecord(name, self.record.ops)
        record.report = module.report
        if not first:
            _GRAPHS.append(record)
        log.info("optic: %s", record)
        weights = [args[i] for i in self.weight_at]
        state = _Frozen(weights, [t._version for t in weights + self.own],
                        [args[i].item() for i in self.scalar_at], module, {})
        self.states.append(state)
        return state

    def _give_up(self, why: str) -> None:
        self.given_up = why
        self.states.clear()
        self.record.traced = why if self.record.report is None else \
            f"after {self.optimizations - 1} optimization(s): {why}"
        log.info("optic: %s", self.record)
        warnings.warn(f"optic (torch.compile backend): graph {self.record.graph} runs as dynamo traced it, "
                      f"unoptimized: {why}", stacklevel=4)

    def _checked(self, state: _Frozen, args: tuple, inputs: list[Any]) -> Any:
        """A graph with symbolic sizes: at sizes optic's result has not run at, it is checked once against
        the traced graph, and the traced graph serves the sizes where they disagree."""
        key = tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in inputs)
        ok = state.checked.get(key)
        if ok is True:
            return state.module(*inputs)
        if ok is False:
            return self.gm(*args)
        expected = self.gm(*args)
        try:
            c = compare(expected, state.module(*inputs), state.module.report.tolerance)
            ok, detail = c.ok, str(c)
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        state.checked[key] = ok
        if not ok:
            log.info("optic: graph %s runs as traced at sizes %s: optic's result disagrees there (%s)",
                     self.record.graph, key, detail)
        return expected


def _symbolic(node: fx.Node) -> bool:
    from torch.fx.experimental.symbolic_shapes import has_free_symbols

    value = node.meta.get("example_value")
    return isinstance(value, torch.Tensor) and has_free_symbols(value)
