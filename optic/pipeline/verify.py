"""Numerical checks: the one place that decides whether two models agree.

Outputs are compared leaf by leaf, whatever their container (pytrees, and dataclasses field by field).
Error measure (fp32 default): for each output tensor, ``max|got − ref| / max|ref|`` (the output
scale); the worst output counts. Integer and bool outputs must be equal. NaN must match NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from .. import device
from ..ir.contract import equal_values, flatten

DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass
class Comparison:
    max_abs: float
    rel: float  # max_abs relative to the output scale (worst output)
    scale: float
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"max|Δ| {self.max_abs:.3g} ({self.rel:.3g} of output scale {self.scale:.3g})" + (
            f": {self.detail}" if self.detail else "")


def tensor_leaves(out: Any) -> list[Any]:
    return flatten(out)[0]


def tolerance_for(outputs: Any, tolerance: float | None) -> float:
    if tolerance is not None:
        return tolerance
    dtypes = [t.dtype for t in tensor_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return max((DEFAULT_TOLERANCE.get(d, 1e-4) for d in dtypes), default=1e-4)


def compare(ref: Any, got: Any, tolerance: float) -> Comparison:
    """Compare two model outputs (any pytree of tensors) under a relative tolerance."""
    ref_leaves, got_leaves = flatten(ref)[0], flatten(got)[0]
    if len(ref_leaves) != len(got_leaves):
        return Comparison(float("inf"), float("inf"), 0.0, False,
                          f"output structure differs: {len(ref_leaves)} vs {len(got_leaves)} values")
    worst = Comparison(0.0, 0.0, 0.0, True)
    for i, (r, g) in enumerate(zip(ref_leaves, got_leaves, strict=True)):
        c = _compare_leaf(r, g, tolerance, i)
        if not c.ok:
            return c
        if c.rel >= worst.rel:
            worst = c
    return worst


def _compare_leaf(r: Any, g: Any, tolerance: float, i: int) -> Comparison:
    if not isinstance(r, torch.Tensor):
        same = not isinstance(g, torch.Tensor) and (equal_values(r, g) or (
            isinstance(r, float) and isinstance(g, float) and abs(r - g) <= tolerance * max(abs(r), 1e-12)))
        return Comparison(0.0, 0.0, 0.0, bool(same), "" if same else f"output {i}: {r!r} != {g!r}")
    if not isinstance(g, torch.Tensor) or r.shape != g.shape:
        return Comparison(float("inf"), float("inf"), 0.0, False,
                          f"output {i}: shape {tuple(r.shape)} vs {getattr(g, 'shape', type(g).__name__)}")
    if not r.is_floating_point() and not r.is_complex():
        eq = bool(torch.equal(r, g.to(r.dtype)))
        return Comparison(0.0 if eq else float("inf"), 0.0 if eq else float("inf"), 0.0, eq,
                          "" if eq else f"output {i}: integer values differ")
    r, g = r.detach(), g.detach().to(r.dtype)
    if r.dtype in (torch.float16, torch.bfloat16):
        r, g = r.float(), g.float()
    fin_r, fin_g = torch.isfinite(r), torch.isfinite(g)
    if not (bool(fin_r.all()) and bool(fin_g.all())):  # rare: compare the non-finite values exactly
        nan_r, nan_g = torch.isnan(r), torch.isnan(g)
        if not torch.equal(nan_r, nan_g):
            return Comparison(float("nan"), float("inf"), 0.0, False, f"output {i}: NaN where the reference has none")
        inf = ~fin_r & ~nan_r
        if not torch.equal(fin_r, fin_g) or not torch.equal(r[inf], g[inf]):
            return Comparison(float("inf"), float("inf"), 0.0, False, f"output {i}: infinities differ")
        r, g = r[fin_r], g[fin_r]
    if r.numel() == 0:
        return Comparison(0.0, 0.0, 0.0, True)
    diff = (r - g).abs().max().item()
    scale = r.abs().max().item()
    rel = diff / max(scale, 1e-30)
    ok = rel <= tolerance
    return Comparison(diff, rel, scale, ok, "" if ok else f"output {i} exceeds tolerance {tolerance:g}")


def generated_inputs(args: tuple, kwargs: dict, n: int, seed: int = 0) -> list[tuple[tuple, dict]]:
    """``n`` input sets shaped like the examples: floats drawn with the example's mean and spread,
    integers within the example's range (token ids stay valid ids), bools copied (masks stay masks)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(pytree.tree_map(lambda t: _like(t, gen), (args, kwargs)))
    return out


def _like(t: Any, gen: torch.Generator) -> Any:
    if not isinstance(t, torch.Tensor) or t.numel() == 0:
        return t
    if t.is_floating_point():
        std = t.float().std().item() if t.numel() > 1 else 1.0
        std = std if std > 0 and std == std else 1.0
        x = device.randn(t.shape, gen, like=t.float()) * std + t.float().mean().item()
        return x.to(t.dtype).contiguous(memory_format=memory_format_of(t))
    if t.dtype == torch.bool:
        return t.clone()
    lo, hi = int(t.min()), int(t.max())
    return device.randint(lo, hi + 1, t.shape, gen, t.device, t.dtype)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def run_seeded(fn: Any, args: tuple, kwargs: dict, seed: int = 0) -> Any:
    """Run ``fn`` with a fixed RNG state, so random ops (training-mode dropout) repeat exactly."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        return fn(*args, **kwargs)
