"""Helpers shared by the zoo's model builders: seeding, norm randomisation, example inputs."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AFFINE_NORMS = (nn.LayerNorm, nn.GroupNorm)


def randomize_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every norm layer of ``model`` non-trivial statistics and affine parameters.

    BatchNorm layers get random ``running_mean`` (normal, std 0.1), ``running_var`` (uniform
    0.5..2), ``weight`` (uniform 0.5..1.5) and ``bias`` (normal, std 0.1), so that folding a
    BatchNorm into its producer actually changes the producer's weights.  LayerNorm and
    GroupNorm layers with affine parameters get the same treatment of ``weight`` and ``bias``.
    Works on any module whose norms subclass the torch ones (Hugging Face models included).
    Returns ``model``.
    """
    g = generator
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BATCHNORMS):
                if m.running_mean is not None:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                if m.running_var is not None:
                    m.running_var.copy_(0.5 + 1.5 * torch.rand(m.running_var.shape, generator=g))
            if isinstance(m, (*_BATCHNORMS, *_AFFINE_NORMS)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model


def seeded(build: Callable[[], M]) -> Callable[[], M]:
    """Wrap a model builder into a zoo factory.

    The factory calls ``torch.manual_seed(0)`` before building (inside ``fork_rng`` so the
    caller's global RNG state is left as it was), randomises the norm layers with
    :func:`randomize_norms` and returns the model in eval mode.  Two calls therefore give
    identical weights.
    """

    @functools.wraps(build)
    def factory() -> M:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = build()
            randomize_norms(model)
        return model.eval()

    return factory


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def image_inputs(channels: int, *spatial: int, seed: int = 0) -> Callable[[int], tuple]:
    """Inputs function giving one float tensor of shape (batch, channels, *spatial)."""

    def inputs(batch: int) -> tuple:
        return (torch.randn((batch, channels, *spatial), generator=_generator(seed)),)

    return inputs


def float_inputs(*shape: int, seed: int = 0) -> Callable[[int], tuple]:
    """Inputs function giving one float tensor of shape (batch, *shape)."""

    def inputs(batch: int) -> tuple:
        return (torch.randn((batch, *shape), generator=_generator(seed)),)

    return inputs


def token_inputs(vocab: int, seq: int, *, with_mask: bool = False, seed: int = 0) -> Callable[[int], tuple]:
    """Inputs function giving int64 token ids of shape (batch, seq) in [0, vocab).

    With ``with_mask`` it also gives an int64 ``attention_mask`` of the same shape: ones, except
    that every odd-numbered sample has its last quarter of positions padded (zeros).
    """

    def inputs(batch: int) -> tuple:
        ids = torch.randint(0, vocab, (batch, seq), generator=_generator(seed), dtype=torch.long)
        if not with_mask:
            return (ids,)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1::2, seq - max(1, seq // 4) :] = 0
        return (ids, mask)

    return inputs


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Flatten a model output (tensor, tuple/list, dict or HF ``ModelOutput``) into its tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two model outputs of the same structure."""
    ta, tb = output_tensors(a), output_tensors(b)
    if len(ta) != len(tb):
        raise ValueError(f"outputs hold {len(ta)} and {len(tb)} tensors")
    worst = 0.0
    for x, y in zip(ta, tb, strict=True):
        if x.shape != y.shape:
            raise ValueError(f"output shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel():
            d = (x.double() - y.double()).abs().max().item()
            worst = max(worst, d if not math.isnan(d) else math.inf)
    return worst
