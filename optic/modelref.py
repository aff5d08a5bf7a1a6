"""Find a model and its example inputs from a command-line reference.

A MODEL reference is ``path/to/file.py:attr`` or ``package.module:attr``, where ``attr`` is a
factory function or an ``nn.Module`` class (called with no arguments) or a module instance.
Example inputs come from an ``example_inputs`` attribute of the same module (a tensor, a tuple
of them, a dict of keyword inputs, or a function returning one), unless ``--input-shape``
specs (``1,3,224,224`` or ``1,128:int64``) replace them.

Loading a file runs its code, as ``python file.py`` would: only point optic at code you trust.
Saved weights are read with ``torch.load(weights_only=True)``, which never unpickles objects.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from .errors import OpticError

INPUTS_ATTR = "example_inputs"
_INT_HIGH = 100  # integer inputs (token ids, indices) are drawn from [0, _INT_HIGH)


def load_model(spec: str) -> tuple[nn.Module, Any]:
    """``file.py:factory`` or ``package.module:attr`` -> (model, example inputs or None)."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        hint = ""
        if spec.endswith(".py") and Path(spec).is_file():
            hint = f" In '{spec}': {_candidates(_import(spec))}"
        raise OpticError(f"MODEL '{spec}' should be path/to/file.py:factory (or :ClassName) or "
                         f"package.module:attr, e.g. examples/resnet_bn.py:build.{hint}")
    module = _import(where)
    with _on_path(module):
        if not hasattr(module, attr):
            raise OpticError(f"'{where}' has no attribute '{attr}'. {_candidates(module)}")
        model = _instantiate(getattr(module, attr), f"{where}:{attr}")
        inputs = _module_inputs(module, where)
    return model, inputs


def load_weights(model: nn.Module, path: str) -> None:
    """Load a saved state dict into ``model``; tensors only (``weights_only=True``), never pickled objects."""
    if not os.path.isfile(path):
        raise OpticError(f"weights file '{path}' not found.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise OpticError(f"could not read weights from '{path}' ({type(e).__name__}: {_first_line(e)}); "
                         "optic reads state dicts saved with torch.save(model.state_dict(), path) and "
                         "never unpickles arbitrary objects.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise OpticError(f"'{path}' holds a {type(state).__name__}, not a state dict.")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise OpticError(f"the weights in '{path}' do not fit the model: {_first_line(e)}") from None


def inputs_from_shapes(specs: list[str], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``["1,3,224,224", "1,128:int64"]`` -> random tensors (floats: randn; integers: [0, 100))."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(_random_tensor(spec, gen) for spec in specs)


def load(spec: str, input_shapes: list[str] | None = None, weights: str | None = None) -> tuple[nn.Module, Any]:
    """A model and the inputs to capture it with: ``input_shapes`` when given, else the module's own."""
    shaped = inputs_from_shapes(input_shapes) if input_shapes else None  # bad specs fail before any import
    model, inputs = load_model(spec)
    if weights:
        load_weights(model, weights)
    if shaped is not None:
        return model, shaped
    if inputs is None:
        raise OpticError(f"no example inputs for '{spec}': the module defines no '{INPUTS_ATTR}'. "
                         "Pass --input-shape 1,3,224,224 (repeat it for each input; add :int64 for "
                         f"integer inputs), or define {INPUTS_ATTR} (a tuple of tensors or a function "
                         "returning one) beside the factory.")
    return model, inputs


CALIBRATION_ATTR = "calibration"


def load_calibration(model_spec: str, ref: str | None) -> Any:
    """Calibration batches for ``--budget``: ``ref`` (``file.py:attr``) when given, else the
    ``calibration`` attribute beside the model's factory; a function is called."""
    if ref:
        where, sep, attr = ref.rpartition(":")
        if not sep or not where or not attr:
            raise OpticError(f"--calibration '{ref}' should be path/to/file.py:attr or package.module:attr")
    else:
        where, attr = model_spec.rpartition(":")[0], CALIBRATION_ATTR
    module = _import(where)
    with _on_path(module):
        if not hasattr(module, attr):
            raise OpticError(f"a budget needs calibration data: '{where}' defines no '{attr}'. Define "
                             f"{attr}() beside the factory (batches of inputs, or (inputs, labels) pairs), or pass "
                             "--calibration file.py:attr")
        return _value_of(module, attr, where)


# -- importing ------------------------------------------------------------------------------------
def _import(where: str) -> ModuleType:
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            hint = "" if where.endswith(".py") else " (a package.module reference has no slashes)"
            raise OpticError(f"model file '{where}' not found (looked in {Path.cwd()}){hint}.")
        return _import_file(path.resolve())
    try:
        with _path_entry(os.getcwd()):
            return importlib.import_module(where)
    except ModuleNotFoundError as e:
        if e.name and where.startswith(e.name):
            raise OpticError(f"cannot import '{where}': no module named '{e.name}'. Give a file "
                             "(path/to/file.py:factory) or a module importable from here.") from None
        raise _user_code_error(f"importing '{where}'", e) from None
    except Exception as e:
        raise _user_code_error(f"importing '{where}'", e) from None


def _import_file(path: Path) -> ModuleType:
    name = f"_optic_model_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise OpticError(f"'{path}' cannot be imported as Python source.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        with _path_entry(str(path.parent)):  # so the file can import its neighbours
            spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise _user_code_error(f"running '{path}'", e) from None
    return module


@contextlib.contextmanager
def _path_entry(entry: str):
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def _on_path(module: ModuleType):
    """Factories may import lazily from their own folder."""
    file = getattr(module, "__file__", None)
    return _path_entry(str(Path(file).parent)) if file else contextlib.nullcontext()


# -- the model and its inputs -----------------------------------------------------------------------
def _instantiate(obj: Any, ref: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise OpticError(f"'{ref}' is a {type(obj).__name__}, not a model factory, class or module.")
    try:
        model = obj()
    except TypeError as e:
        if _needs_arguments(obj):
            raise OpticError(f"'{ref}' needs arguments ({_first_line(e)}); optic calls it with none. "
                             "Write a small factory function without arguments that builds the model.") from None
        raise _user_code_error(f"calling {ref}()", e) from None
    except Exception as e:
        raise _user_code_error(f"calling {ref}()", e) from None
    if not isinstance(model, nn.Module):
        raise OpticError(f"{ref}() returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _needs_arguments(fn: Any) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               for p in sig.parameters.values())


def _value_of(module: ModuleType, attr: str, where: str) -> Any:
    """``module.attr``, called when it is a function (the user's code: errors name it)."""
    value = getattr(module, attr)
    if callable(value) and not isinstance(value, torch.Tensor):
        try:
            value = value()
        except Exception as e:
            raise _user_code_error(f"calling {where}:{attr}()", e) from None
    return value


def _module_inputs(module: ModuleType, where: str) -> Any:
    if not hasattr(module, INPUTS_ATTR):
        return None
    value = _value_of(module, INPUTS_ATTR, where)
    if not isinstance(value, torch.Tensor | tuple | list | dict):
        raise OpticError(f"{where}:{INPUTS_ATTR} is a {type(value).__name__}; it should be a tensor, a tuple "
                         "of tensors, a dict of keyword inputs, or a function returning one.")
    return value


def _candidates(module: ModuleType) -> str:
    """What the module defines that could be a factory: its own functions and nn.Module classes."""
    own = [name for name, obj in vars(module).items()
           if not name.startswith("_") and getattr(obj, "__module__", None) == module.__name__
           and (inspect.isfunction(obj) or inspect.isclass(obj)) and name != INPUTS_ATTR]
    instances = [name for name, obj in vars(module).items() if isinstance(obj, nn.Module) and not name.startswith("_")]
    found = own + instances
    if not found:
        return "It defines no functions, classes or modules of its own."
    return f"Callables it defines: {', '.join(found)}."


def _random_tensor(spec: str, gen: torch.Generator) -> torch.Tensor:
    text, _, dtype_name = spec.strip().partition(":")
    try:
        shape = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
        if any(s < 0 for s in shape):
            raise ValueError
    except ValueError:
        raise OpticError(f"bad --input-shape '{spec}': expected comma-separated sizes with an optional dtype, "
                         "e.g. 1,3,224,224 or 1,128:int64.") from None
    dtype = torch.float32
    if dtype_name:
        dtype = getattr(torch, dtype_name.strip(), None)
        if not isinstance(dtype, torch.dtype):
            raise OpticError(f"bad dtype '{dtype_name}' in --input-shape '{spec}'; use a torch dtype name such "
                             "as float32, float16, bfloat16, int64, int32 or bool.")
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    return torch.randint(0, _INT_HIGH, shape, generator=gen).to(dtype)


# -- messages -------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _user_code_error(doing: str, e: BaseException) -> OpticError:
    """An error raised by the user's code, with the innermost line of it that was running."""
    here = os.path.dirname(os.path.abspath(__file__))
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(here) and not f.filename.startswith("<frozen")]
    where = f"\n  at {frames[-1].filename}:{frames[-1].lineno}: {(frames[-1].line or '').strip()}" if frames else ""
    return OpticError(f"{doing} raised {type(e).__name__}: {_first_line(e)}{where}")
