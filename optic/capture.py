"""Capture: a model and example inputs become a Program.

Two first-class paths:

- ``fx``: ``torch.fx`` symbolic trace, a module-level graph (``nn.Conv2d`` calls, ``F.relu``...).
  Arguments the caller does not pass are fixed to their defaults (``concrete_args``), and the
  traced graph is checked against eager on the examples: a trace that silently specialized
  Python control flow is rejected.
- ``export``: ``torch.export.export(strict=False)``, an ATen-level graph with static shapes. Real
  models (every Hugging Face ``transformers`` model tried) arrive this way.

``method="auto"`` tries fx, then export. When every path fails, :class:`CaptureError` names the
line of the model's source that broke tracing and what to do about it. The user's model is never
touched: capture works on a deep copy.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import os
import sys
import traceback
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from .contract import CallSignature, flatten
from .errors import CaptureError
from .ir import eliminate_dead_code, init_provenance
from .program import Program
from .verify import compare, run_seeded

log = logging.getLogger("optic.capture")

METHODS = ("auto", "fx", "export")


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None = None) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional inputs, or a dict of keyword inputs -> (args, kwargs)."""
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), kwargs
    if isinstance(example_inputs, dict):
        return (), {**example_inputs, **kwargs}
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs), kwargs
    if example_inputs is None:
        return (), kwargs
    raise CaptureError(
        f"example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs; got "
        f"{type(example_inputs).__name__}. Pass e.g. (torch.randn(1, 3, 224, 224),).")


def capture(model: nn.Module, example_inputs: Any, example_kwargs: dict | None = None, *,
            method: str = "auto", inference: bool = True) -> Program:
    """Capture ``model`` called on the example inputs as a Program (on a deep copy of the model)."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"optic optimizes torch.nn.Module instances; got {type(model).__name__}.")
    if method not in METHODS:
        raise CaptureError(f"unknown capture method '{method}'; choose one of {', '.join(METHODS)}.")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    try:
        work = copy.deepcopy(model)
    except Exception as e:
        raise CaptureError(f"the model could not be deep-copied ({type(e).__name__}: {e}); optic never "
                           "modifies the user's model, so it needs a copy. Make the model's attributes "
                           "copyable (e.g. drop open file handles or locks from the module).") from None
    notes: list[str] = []
    if inference:
        training = [name or type(work).__name__ for name, m in work.named_modules() if m.training]
        if training:
            notes.append(f"model had {len(training)} module(s) in training mode (e.g. '{training[0]}'); "
                         "optimized for inference, with model.eval() semantics (pass inference=False to keep them)")
        work.eval()
    state = {name: t.detach().clone() for name, t in _state(work)}
    try:
        with torch.no_grad():
            expected = run_seeded(work, args, kwargs)
    except Exception as e:
        raise CaptureError(f"the model fails on the example inputs before any capture: {type(e).__name__}: "
                           f"{_first_line(e)}{_where(e)}. Check the shapes and dtypes of example_inputs.") from None
    mutated = [name for name, t in _state(work) if not _unchanged(state[name], t)]
    if mutated:
        notes.append(f"forward updates {_names(mutated)} in place; the optimized module updates its own copy, "
                     "never your model's")
    leaves, structure = flatten(expected)

    errors: list[tuple[str, BaseException]] = []
    for path in (("fx", "export") if method == "auto" else (method,)):
        try:
            program = _capture_fx(work, args, kwargs) if path == "fx" else _capture_export(work, args, kwargs, structure)
        except Exception as e:
            log.debug("capture with %s failed:\n%s", path, traceback.format_exc())
            errors.append((path, e))
            continue
        got = run_seeded(program.gm, args, kwargs)
        got_leaves, got_structure = flatten(got)
        c = compare(leaves, got_leaves, 1e-5)
        if not c.ok:
            why = (f"forward updates {_names(mutated)} in place, so a second call computes something else: "
                   "optic runs the model many times to verify it and needs a forward whose outputs do not depend "
                   "on its earlier calls. Move the update out of forward (or reset the state before each call)"
                   if mutated else "Python control flow was probably specialized")
            errors.append((path, CaptureError(f"the {path} graph disagrees with eager on the examples ({c}); {why}")))
            continue
        if errors:
            notes.append(f"{errors[-1][0]} capture failed ({_first_line(errors[-1][1])}); used {path}")
        program.notes = notes + program.notes
        program.signature = CallSignature(work.forward, args, kwargs,
                                          specialized=path == "export")
        program.out_structure = None if got_structure == structure else structure
        init_provenance(program.gm)
        program.annotate_shapes()
        return program
    raise _capture_error(errors)


def _capture_fx(model: nn.Module, args: tuple, kwargs: dict) -> Program:
    sig = inspect.signature(model.forward)
    bound = sig.bind_partial(*args, **kwargs)
    concrete = {name: p.default for name, p in sig.parameters.items()
                if name not in bound.arguments and p.default is not inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    tracer = _SourceTracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    for node in graph.nodes:
        if isinstance(node.type, str):  # `from __future__ import annotations`: a string the pickler cannot import
            node.type = None
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    return Program(gm, "fx", args, kwargs)


class _SourceTracer(fx.Tracer):
    """Records, for every node, the innermost frame of the model's own code (file, line, function).

    fx's ``record_stack_traces`` formats the whole stack for every node (seconds on a GPT-2);
    one frame is all provenance needs."""

    _skip = (os.path.dirname(fx.__file__), os.path.dirname(nn.__file__), os.path.dirname(os.path.abspath(__file__)))

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if node.op in ("placeholder", "output"):  # made by the tracer itself, not by a model line
            return node
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(self._skip):
            frame = frame.f_back
        if frame is not None:
            code = frame.f_code
            node.meta["stack_trace"] = f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n'
        return node


def _capture_export(model: nn.Module, args: tuple, kwargs: dict, structure=None) -> Program:
    # torch.export only returns pytree-registered types: with dataclasses in the output, export the
    # output's leaves instead (the optimized module rebuilds them). ``model`` is capture's own copy.
    leaves_only = structure is not None and any(part is not None for part in structure.parts)
    if leaves_only:
        forward = model.forward

        @functools.wraps(forward)
        def leaves_forward(*a, **k):
            return tuple(flatten(forward(*a, **k))[0])

        model.forward = leaves_forward
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    finally:
        if leaves_only:
            del model.forward
    gm = ep.module()
    # The guard module checks input shapes; OptimizedModule checks them itself with a clearer
    # error, and the guard is opaque to passes, so it goes.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            gm.graph.erase_node(node)
    eliminate_dead_code(gm)
    gm.delete_all_unused_submodules()
    # Unpickling re-traces the code with this tracer class; export's needs a scope it no longer has.
    gm._tracer_cls, gm._tracer_extras = None, {}
    gm.graph._tracer_cls, gm.graph._tracer_extras = None, {}
    gm.recompile()
    return Program(gm, "export", args, kwargs)


def _state(model: nn.Module):
    """The model's parameters and buffers, by name."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def _unchanged(before: torch.Tensor, after: torch.Tensor) -> bool:
    return before.shape == after.shape and bool(torch.equal(before, after) or (
        before.is_floating_point() and torch.allclose(before, after, rtol=0, atol=0, equal_nan=True)))


def _names(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"{'state' if len(names) > 1 else 'the state'} {shown}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_TORCH_DIRS = tuple(os.path.dirname(m.__file__) for m in (torch,))


def _user_frame(e: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the model's code, not torch's or optic's."""
    optic_dir = os.path.dirname(os.path.abspath(__file__))
    frames = traceback.extract_tb(e.__traceback__)
    user = [f for f in frames if not f.filename.startswith(_TORCH_DIRS) and not f.filename.startswith(optic_dir)
            and "<" not in f.filename and "/contextlib.py" not in f.filename]
    return user[-1] if user else None


def _where(e: BaseException) -> str:
    f = _user_frame(e)
    return f" (at {f.filename}:{f.lineno}: {f.line.strip() if f.line else ''})" if f else ""


def _capture_error(errors: list[tuple[str, BaseException]]) -> CaptureError:
    lines = ["optic could not capture the model as a graph."]
    for path, e in errors:
        f = _user_frame(e)
        where = f"\n      at {f.filename}:{f.lineno}\n        {f.line.strip() if f.line else ''}" if f else ""
        lines.append(f"  - {'torch.fx symbolic trace' if path == 'fx' else 'torch.export (non-strict)'}: "
                     f"{type(e).__name__}: {_first_line(e)}{where}")
    lines.append(
        "What to do: data-dependent Python control flow (an `if` or loop on a tensor's values) cannot be "
        "captured. Rewrite it with tensor ops (torch.where, masking) or torch.cond, or move that part "
        "out of the module you optimize (optimize the submodules around it). Control flow on shapes or "
        "Python values works with capture='export'.")
    err = CaptureError("\n".join(lines))
    err.frames = [(p, _user_frame(e)) for p, e in errors]  # type: ignore[attr-defined]
    return err
