"""Hugging Face models stay Hugging Face models.

``optic.optimize`` on a ``transformers`` ``PreTrainedModel`` returns an instance of a subclass of the
model's own class (``isinstance(result, GPT2LMHeadModel)`` holds) that keeps ``config``,
``generation_config``, ``device``, ``dtype``, ``main_input_name`` and the ``ModelOutput`` classes, and whose
``forward`` is optic's optimized graph. For a model that can generate, a second graph is optimized: the call
``generate`` makes at each step, recorded on a one-token greedy generation from the example's token ids,
with a dynamic batch and sequence length. ``result.generate(...)`` then runs every step through it.

The KV cache is not carried: each step computes the whole sequence again (``use_cache=False``), which is
what ``generate`` is told; a call that asks for the cache gets a warning and runs without it. The graphs
are verified like any other (every pass, on inputs of other lengths too), so the tokens are the original's
within the tolerance; the report of the generation graph is ``result.optic_generate.report``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import warnings
from typing import Any

import torch
import torch.nn as nn

from .errors import InputMismatchError

log = logging.getLogger("optic")
_STEP = {"building": False}


def is_hf(model: nn.Module) -> bool:
    """A ``transformers`` ``PreTrainedModel`` (without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


def can_generate(model: nn.Module) -> bool:
    try:
        return bool(model.can_generate())
    except Exception:
        return False


def building_step() -> bool:
    """Whether optimize is building the generation graph (it must not build one of its own)."""
    return _STEP["building"]


@contextlib.contextmanager
def _building():
    before = _STEP["building"]
    _STEP["building"] = True
    try:
        yield
    finally:
        _STEP["building"] = before


def step_example(model: nn.Module, args: tuple, kwargs: dict) -> tuple[dict, dict] | None:
    """The keyword arguments ``generate`` passes to ``forward`` for the example's token ids (recorded on a copy
    of the model, one greedy token, no cache) and the dynamic dimensions for them, or None when the example
    holds no token ids."""
    ids = kwargs.get("input_ids", next((a for a in args if isinstance(a, torch.Tensor)), None))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        return None
    mask = kwargs.get("attention_mask")
    work = copy.deepcopy(model).eval()
    seen: list[dict] = []
    hook = work.register_forward_pre_hook(lambda _m, _a, k: seen.append(dict(k)), with_kwargs=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extra = {"attention_mask": mask} if isinstance(mask, torch.Tensor) else {}
            work.generate(ids, max_new_tokens=1, do_sample=False, use_cache=False, **extra)
    except Exception as e:
        log.info("optic: recording a generation step failed (%s); no generation graph", e)
        return None
    finally:
        hook.remove()
    if not seen:
        return None
    step = seen[0]
    seq = ids.shape[1]
    dynamic: dict[str, Any] = {}
    for name, v in step.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            dims = {d: "seq" for d in range(v.dim()) if v.shape[d] == seq and (d > 0 or v.dim() == 1)}
            if dims:
                dynamic[name] = dims
    return step, dynamic


class OptimizedHF:
    """Mixed in before the model's own class: ``forward`` runs optic's graphs, ``generate`` the generation
    graph. Built by :func:`wrap`; see the module doc."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.optic_main(*args, **kwargs)
        except InputMismatchError as first:
            step = self._modules.get("optic_generate")
            if step is None:
                raise
            try:
                return step(*args, **kwargs)
            except InputMismatchError as second:
                raise InputMismatchError(f"{first}\nThe generation graph does not take this call either: "
                                         f"{second}") from None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if "optic_generate" not in self._modules:
            raise InputMismatchError("this optimized model has no generation graph (its example held no token "
                                     "ids, or recording a generation step failed): optimize it with token ids "
                                     "as the example inputs")
        if kwargs.get("use_cache"):
            warnings.warn("optic: the optimized model generates without a KV cache (each step computes the "
                          "whole sequence); use_cache=True is ignored", stacklevel=2)
        kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)

    @property
    def report(self) -> Any:
        return self.optic_main.report

    @property
    def program(self) -> Any:
        return self.optic_main.program

    def __reduce__(self):  # the class is made at run time: pickle it as "the model's class, optimized"
        return _rebuild, (type(self).__mro__[2], self.__dict__)


_CLASSES: dict[type, type] = {}


def _class_for(cls: type) -> type:
    if cls not in _CLASSES:
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return OptimizedHF.forward(self, *args, **kwargs)

        # generate() reads forward's signature to decide which inputs to make (position_ids...): the model's
        forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
        _CLASSES[cls] = type(f"Optimized{cls.__name__}", (OptimizedHF, cls),
                             {"__module__": __name__, "__doc__": f"{cls.__name__}, optimized by optic.",
                              "forward": forward})
    return _CLASSES[cls]


def _rebuild(cls: type, state: dict) -> Any:
    obj = _class_for(cls).__new__(_class_for(cls))
    obj.__dict__.update(state)
    return obj


def wrap(model: nn.Module, main: nn.Module, step: nn.Module | None) -> nn.Module:
    """``main`` (and the generation graph ``step``) inside an instance of the model's own class, optimized."""
    cls = type(model)
    out = _class_for(cls).__new__(_class_for(cls))
    nn.Module.__init__(out)
    skip = set(out.__dict__)
    for k, v in model.__dict__.items():  # config, generation_config, name_or_path...: copies, never shared
        if k not in skip:
            object.__setattr__(out, k, copy.deepcopy(v))
    out.optic_main = main
    if step is not None:
        out.optic_generate = step
        main.report.notes.append(f"generation: a second graph serves generate() (no KV cache; its report: "
                                 f"result.optic_generate.report, {len(step.report.passes)} passes, max error "
                                 f"{step.report.final_error:.1e})")
    out.eval()
    return out
