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

import contextlib
import copy
import functools
import inspect
import io
import logging
import os
import re
import sys
import traceback
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError, OpticError
from ..pipeline.verify import compare, run_seeded
from .contract import CallSignature, flatten
from .dynamic import Dims, batch_size, export_spec, name_dims, outside, read_dims, resize_inputs, resized
from .dynamic import request as dynamic_request
from .graph import eliminate_dead_code, init_provenance
from .program import Program

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
            method: str = "auto", inference: bool = True, dynamic: Any = "auto") -> Program:
    """Capture ``model`` called on the example inputs as a Program (on a deep copy of the model).

    ``dynamic`` (export captures; see :mod:`optic.ir.dynamic`): ``"auto"`` makes the batch dimension dynamic
    where export can keep it so, a dict names more dimensions, ``False`` keeps the example's shapes."""
    req = dynamic_request(dynamic)
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
    _register_hf_caches(work)  # before the outputs are flattened: a cache in them is a pytree, not one value
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
            program = _capture_fx(work, args, kwargs) if path == "fx" else \
                _capture_export(work, args, kwargs, structure, req)
        except OpticError:  # a request optic refuses (dynamic dims the model cannot have): said as it is
            raise
        except Exception as e:
            log.debug("capture with %s failed:\n%s", path, traceback.format_exc())
            errors.append((path, e))
            continue
        got = run_seeded(program.gm, args, kwargs)
        got_leaves, got_structure = flatten(got)
        c = compare(leaves, got_leaves, 1e-5)
        if not c.ok and program.dims:  # a dynamic graph wrong at the example itself: the example's shapes
            program = _capture_export(work, args, kwargs, structure, None)
            program.notes.append("the dynamic dimensions stayed static: the graph exported with them disagrees "
                                 "with eager on the example")
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
        program.size_checks, fx_batch = _other_sizes(work, program)
        if fx_batch and program.size_checks:  # an fx graph serves other batches as the model does: say so
            program.dims = fx_batch
        if program.dims and not program.size_checks:
            program = _capture_export(work, args, kwargs, structure, None)
            program.notes.append("the dynamic dimensions stayed static: the graph exported with them disagrees "
                                 "with eager at another size")
        if errors:
            notes.append(f"{errors[-1][0]} capture failed ({_first_line(errors[-1][1])}); used {path}")
        program.notes = notes + program.notes
        program.signature = CallSignature(work.forward, args, kwargs,
                                          specialized=path == "export", dims=program.dims)
        program.out_structure = None if got_structure == structure else structure
        if program.dims:
            program.dims.labels = _input_labels(program.signature, kwargs)
        init_provenance(program.gm)
        program.annotate_shapes()
        return program
    raise _capture_error(errors)


def _register_hf_caches(model: nn.Module) -> None:
    """Hugging Face cache objects (``DynamicCache``...) in a model's inputs or outputs become pytrees that
    torch.export can take and return, as transformers' own exporter registers them (its caches are not
    registered on import). Nothing happens for other models."""
    if not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:  # another transformers release: export says what it cannot return
        return
    try:
        register_cache_pytrees_for_model(model)
    except Exception as e:
        log.debug("registering the model's cache classes failed: %s", e)


def _input_labels(sig: CallSignature, kwargs: dict) -> list[str]:
    """A name per flat graph input (the argument it comes from), for reports and messages."""
    if sig.sig is None:
        return []
    names: list[str] = []
    for key in [*sig.pos_keys, *kwargs]:
        if key in sig.example:
            n = len(torch.utils._pytree.tree_leaves(sig.example[key]))
            label = key if isinstance(key, str) else f"{key[0]}[{key[1]}]"
            names += [label] if n == 1 else [f"{label}[{j}]" for j in range(n)]
    return names


def _flat_forward(forward: Any, args: tuple, kwargs: dict) -> Any:
    """``forward`` with a signature of exactly this call's arguments: the positional ones by their names
    (``arg<i>`` beyond the named ones), then each keyword as keyword-only."""
    sig = inspect.signature(forward)
    named = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    pos = [named[i] if i < len(named) else f"arg{i}" for i in range(len(args))]
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in pos]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs if k not in pos]

    def flat(*a: Any, **k: Any) -> Any:
        return forward(*a, **k)

    flat.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return flat


def _suggested_fixes(message: str) -> str:
    """The "Suggested fixes:" block of an export constraint error (the rest confuses torch's parser)."""
    lines = message.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Suggested fixes:")
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.strip():
            break
        block.append(line)
    return "\n".join(block)


def _other_sizes(model: nn.Module, program: Program) -> tuple[list[tuple[tuple, dict]], Any]:
    """An input set at other sizes of the dimensions the graph serves at any size, checked against eager, for
    the pipeline to verify every pass there too (a kernel specialized to the example's size is caught, not
    returned): the dynamic dimensions of an export graph; the batch of an fx graph (as general as the model's
    Python) where the model takes another batch. Empty where there is none, or the graph disagrees there.
    Second: the batch dimensions of an fx graph (None for export)."""
    flat = program.flat_inputs()
    dims, fx_batch = program.dims, None
    if program.capture == "fx":
        batch = batch_size(flat)
        dims = fx_batch = Dims({i: {0: ("batch", 1, None)} for i, t in enumerate(flat)
                                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == batch}) \
            if batch else Dims()
    checks = []
    for sizes in resized(flat, dims) if dims else []:
        a, k = resize_inputs(program.example_args, program.example_kwargs, sizes, seed=2 + len(checks))
        try:
            # a graph that takes only the example's size fails here, as expected: fx would print its traceback
            with contextlib.redirect_stderr(io.StringIO()):
                want = run_seeded(model, a, k)
                got = run_seeded(program.gm, a, k)
        except Exception:
            return [], fx_batch
        if not compare(flatten(want)[0], flatten(got)[0], 1e-5).ok:
            return [], fx_batch
        checks.append((a, k))
    return checks, fx_batch


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


def _capture_export(model: nn.Module, args: tuple, kwargs: dict, structure=None, req: Any = None) -> Program:
    # torch.export only returns pytree-registered types: with dataclasses in the output, export the
    # output's leaves instead (the optimized module rebuilds them). ``model`` is capture's own copy.
    leaves_only = structure is not None and any(part is not None for part in structure.parts)
    if leaves_only:
        forward = model.forward

        @functools.wraps(forward)
        def leaves_forward(*a, **k):
            return tuple(flatten(forward(*a, **k))[0])

        model.forward = leaves_forward
    notes: list[str] = []
    try:
        ep, dims = _export_dynamic(model, args, kwargs, req, notes) if req is not None and req.any else (None, None)
        if ep is None:
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
    _flat_outputs_if_opaque(gm)
    # Unpickling re-traces the code with this tracer class; export's needs a scope it no longer has.
    gm._tracer_cls, gm._tracer_extras = None, {}
    gm.graph._tracer_cls, gm.graph._tracer_extras = None, {}
    gm.recompile()
    program = Program(gm, "export", args, kwargs, notes=notes)
    program.dims = dims or Dims()
    return program


def _plain_spec(spec: pytree.TreeSpec) -> bool:
    """Whether every container of an output spec is a plain tuple, list or dict, or a named tuple: what fx
    rebuilds as it was when it traces the graph's code again (unpickling). A dict subclass (a Hugging Face
    ``ModelOutput``) would come back a plain dict, and other containers (a cache) not at all."""
    t = spec.type
    if t is not None and not (t in (tuple, list, dict) or (isinstance(t, type) and issubclass(t, tuple)
                                                           and hasattr(t, "_fields"))):
        return False
    return all(_plain_spec(c) for c in spec.children())


def _flat_outputs_if_opaque(gm: fx.GraphModule) -> None:
    """Make an exported graph return its output leaves flat when its output holds another container (a
    Hugging Face ``ModelOutput`` or cache): the graph's code would build that object, and unpickling, which
    traces the code again, cannot build it (or builds a plain dict). The optimized module rebuilds the
    object from the leaves (``Program.out_structure``)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.out_spec is None or _plain_spec(info.out_spec):
        return
    flat = pytree.tree_structure(tuple(range(info.out_spec.num_leaves)))
    codegen.pytree_info = info._replace(out_spec=flat)
    if hasattr(gm, "_out_spec"):
        gm._out_spec = flat
    gm.recompile()


def _export_dynamic(model: nn.Module, args: tuple, kwargs: dict, req: Any, notes: list[str]):
    """Export with the requested dynamic dimensions, proved by export and checked on an input of another
    size; ``(None, None)`` with a note when the model keeps a dimension static (the caller exports with the
    example's shapes)."""
    what = "the batch dimension" if req.batch and not req.named else "the dynamic dimensions"
    prev = model.__dict__.get("forward")
    try:
        # dynamic_shapes must match how export binds the call; a forward with **kwargs (every Hugging Face
        # model) binds its keywords in a bundle export's spec matching trips on: give it a flat signature
        model.forward = _flat_forward(model.forward, args, kwargs)
        spec, t_args, t_kwargs, declared, leaf_specs = export_spec(model.forward, args, kwargs, req)
        ep, err = None, None
        for _ in range(2):  # once more with export's own suggested ranges (e.g. seq <= 512)
            try:
                ep = torch.export.export(model, t_args, t_kwargs, dynamic_shapes=spec, strict=False)
                break
            except Exception as e:
                err = e
                try:
                    from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

                    spec = refine_dynamic_shapes_from_suggested_fixes(_suggested_fixes(str(e)), spec)
                except Exception:
                    break
    except OpticError:
        raise
    except Exception as e:  # no signature to bind, ...: static, said so
        notes.append(f"{what} stayed static: {_first_line(e)}")
        return None, None
    finally:
        if prev is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = prev
    if ep is None:
        if req.named:
            raise CaptureError(f"torch.export could not keep the requested dimensions dynamic: {_first_line(err)}. "
                               "Ask for fewer dynamic dimensions (dynamic=...), or dynamic=False for the example's "
                               "shapes.") from None
        notes.append(f"{what} stayed static (the model's code needs its value: {_first_line(err)}); the "
                     "optimized module serves the example's shapes only")
        return None, None
    gm = ep.module()
    found = name_dims(read_dims(gm, ep.range_constraints), declared, leaf_specs)
    if not found:
        notes.append(f"{what} stayed static (export specialized it)")
        return None, None
    why = outside(pytree.tree_leaves((args, kwargs)), found)
    if why:
        notes.append(f"{what} stayed static ({why}); the optimized module serves the example's shapes only")
        return None, None
    return ep, found


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
    unknown = next((m.group(1) for _, e in errors for m in [re.search(r"Found <class '([^']+)'>", str(e))] if m), None)
    if unknown:
        short = unknown.rsplit(".", 1)[-1]
        lines.append(
            f"What to do: the model takes or returns a {short} ({unknown}), a type torch.export cannot "
            "pass through because no pytree is registered for it. Register one "
            "(torch.utils._pytree.register_pytree_node), or call the model so that it neither takes nor "
            f"returns one (for a Hugging Face cache: use_cache=False in the example inputs).")
    else:
        lines.append(
            "What to do: data-dependent Python control flow (an `if` or loop on a tensor's values) cannot be "
            "captured. Rewrite it with tensor ops (torch.where, masking) or torch.cond, or move that part "
            "out of the module you optimize (optimize the submodules around it). Control flow on shapes or "
            "Python values works with capture='export'.")
    err = CaptureError("\n".join(lines))
    err.frames = [(p, _user_frame(e)) for p, e in errors]  # type: ignore[attr-defined]
    return err
