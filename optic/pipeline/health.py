"""Non-finite values in a model: NaN or Inf in its weights and buffers, and in its outputs.

A model with a NaN in a batch-norm statistic runs, and every output is NaN. optic's numerical checks
compare non-finite values position by position (NaN against NaN counts as equal, see
:func:`optic.pipeline.verify.compare`), so such a model verifies "exactly" and a rewrite cannot be told apart
from the original: the report has to say so in a note. These functions find the values to name.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..ir.contract import flatten


def _count(t: torch.Tensor) -> str | None:
    """``"1 NaN and 2 Inf of 8 values"``, or None when every value of ``t`` is finite."""
    if not (t.is_floating_point() or t.is_complex()):
        return None
    t = t.detach()
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if not nan and not inf:
        return None
    parts = [f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else ""]
    return f"{' and '.join(p for p in parts if p)} of {t.numel()} values"


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """The parameters and buffers of ``module`` that hold NaN or Inf, each as
    ``"name (1 NaN of 8 values)"``, module by module as ``state_dict`` lists them (tied tensors once)."""
    found, seen = [], set()
    for prefix, mod in module.named_modules():
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            count = _count(t)
            if count:
                found.append(f"{prefix + '.' if prefix else ''}{name} ({count})")
    return found


def nonfinite_outputs(outputs: Any) -> list[str]:
    """The outputs (leaves of any output structure, numbered as :func:`optic.pipeline.verify.compare` numbers them)
    that hold NaN or Inf, each as ``"output 0: 4 NaN of 20 values"``."""
    found = []
    for i, t in enumerate(flatten(outputs)[0]):
        count = _count(t) if isinstance(t, torch.Tensor) else None
        if count:
            found.append(f"output {i}: {count}")
    return found


def finite_share(outputs: Any) -> float:
    """The share of the float values in ``outputs`` that are finite (1.0 when there are none): 0.0
    means that no value is left for a numerical comparison to measure."""
    floats = [t.detach() for t in flatten(outputs)[0]
              if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    total = sum(t.numel() for t in floats)
    return sum(int(torch.isfinite(t).sum()) for t in floats) / total if total else 1.0


def notes(module: nn.Module, outputs: Any, shown: int = 5) -> list[str]:
    """Report notes for a model (``module``) whose weights or example ``outputs`` are not finite."""
    out = []
    weights = nonfinite_tensors(module)
    if weights:
        more = f" and {len(weights) - shown} more" if len(weights) > shown else ""
        out.append(f"the model's weights are not finite: {'; '.join(weights[:shown])}{more}; its outputs are "
                   "NaN or Inf where these reach them. Fix the checkpoint (or the training run) first")
    values = nonfinite_outputs(outputs)
    if values:
        out.append(f"the original model's outputs on the example inputs are not finite ({'; '.join(values[:shown])}); "
                   "optic's checks compare only the finite values (NaN against NaN counts as equal), so the "
                   "max error says nothing about those")
    return out
