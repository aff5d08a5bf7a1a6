"""Where the examples live: the one place that knows about devices.

A model and its examples on ``cuda`` stay there: every tensor optic makes (generated check inputs,
calibration samples, folded weights) is made on the examples' device, never on torch's default
device, and values drawn from a seeded generator are drawn on the CPU and then moved, so a check
input is the same numbers whatever the device (a CPU generator reproduces on every machine; a CUDA
one does not). Timing waits for the device (:func:`synchronize`) before it reads a clock.
"""

from __future__ import annotations

from typing import Any

import torch

from .ir.contract import flatten

CPU = torch.device("cpu")


def of(tree: Any) -> torch.device:
    """The device of the first tensor in ``tree`` (a model's example inputs), or the CPU when there is none."""
    for leaf in flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return CPU


def of_module(module: torch.nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer, or None when it has none."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def randn(shape: Any, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal values of ``shape`` drawn from the CPU ``generator``, on ``like``'s device and dtype."""
    return torch.randn(tuple(shape), generator=generator, device=CPU).to(device=like.device, dtype=like.dtype)


def randint(low: int, high: int, shape: Any, generator: torch.Generator, device: torch.device,
            dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Integers in ``[low, high)`` drawn from the CPU ``generator``, on ``device`` as ``dtype``."""
    return torch.randint(low, high, tuple(shape), generator=generator, device=CPU).to(device=device, dtype=dtype)


def cuda_in_use() -> bool:
    """Whether this process has started CUDA (only then can work be queued on a GPU)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def synchronize() -> None:
    """Wait for the work queued on the current GPU (nothing to wait for without CUDA)."""
    if cuda_in_use():
        torch.cuda.synchronize()
