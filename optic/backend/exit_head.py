"""An early-exit head and its exit check as one generated kernel (CPU; float32 or uint8 features).

A head (:class:`optic.passes.early_exit.heads.ExitHead`) is a few small PyTorch ops: the mean over the
feature's spatial or token positions, a LayerNorm for tokens, a linear to K logits; its exit check adds a
softmax and a max. At batch 1 each op costs a dispatch of several microseconds, and the head runs once per
sample per exit: about 20 µs a head on the 2-core Zen 4 machine, as much as an int8 layer of the digits CNN,
which left exits after the cheap first layers no gain. One kernel computes all of it, in one call:

    pooled[c] = Σ_positions x[n, c, ·] / positions        (rank 4: [N, C, H, W], either layout; rank 3:
                                                            [N, T, D], mean over T, then LayerNorm)
    logits[n, k] = Σ_c pooled[c]·W[k, c] + b[k]
    confidence[n] = 1 / Σ_k exp(logits[n, k] − max_k logits[n, ·])   (the largest softmax probability)

The sums run in another order than PyTorch's, so the logits differ from the ops' by float rounding. The
pass's thresholds are compared with what this kernel computes at run time, and the model with its exits is
checked on held-out data running it.

:func:`head_kernel` returns the compiled function for a feature's shape and layout, or None where it does
not apply (another device or dtype, no TVM, ``$OPTIC_EXIT_KERNEL=0``).
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

import torch

ENV = "OPTIC_EXIT_KERNEL"
_LOCK = threading.Lock()
LANES = 16  # float32 lanes of an AVX-512 vector (narrower vectors: LLVM splits them)


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def layout(x: torch.Tensor) -> str | None:
    """How the kernel reads ``x``: "cl" (channels-last 4-D), "dense" (contiguous), or None (neither)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return "cl"
    return "dense" if x.is_contiguous() else None


@functools.cache
def _build(rank: int, dims: tuple[int, ...], lay: str, k: int, eps: float | None, dtype: str = "float32") -> Any:
    """The kernel for features ``[N, *dims]`` (any N) read in layout ``lay``, ``k`` classes, a LayerNorm
    with ``eps`` (rank 3) or none. Arguments: x, Wt ([C, K16]: W transposed, zero-padded), bias [K16],
    gamma [C], beta [C] (ones/zeros without a norm), logits [N, K] (out), confidence [N] (out)."""
    import tvm
    from tvm.script import tirx as T

    from optic.tvm_compat import host_target

    N = tvm.tirx.Var("n", "int32")
    K16 = -(-k // LANES) * LANES
    if rank == 4:
        C, H, W = dims
        P = H * W
        shape = (N, C, H, W)
        xst = (H * W * C, 1, W * C, C) if lay == "cl" else (C * H * W, H * W, W, 1)
    elif rank == 3:
        P, C = dims
        shape, xst = (N, P, C), (P * C, C, 1)
    else:
        P, C = 1, dims[0]
        shape, xst = (N, C), (C, 1)
    CB, CT = C // LANES, C % LANES
    NORM, EPS = eps is not None, float(eps or 0.0)

    def at(x, n, c, p):  # the feature's value at channel c, position p, as float32
        if rank == 4:
            v = x[n, c, p // W, p % W]
        elif rank == 3:
            v = x[n, p, c]
        else:
            v = x[n, c]
        return v if dtype == "float32" else T.Cast("float32", v)

    @T.prim_func(s_tir=True)
    def main(x: T.Buffer(shape, dtype, strides=xst), wt: T.Buffer((C, K16), "float32"),
             bias: T.Buffer((K16,), "float32"), gamma: T.Buffer((C,), "float32"), beta: T.Buffer((C,), "float32"),
             logits: T.Buffer((N, k), "float32"), conf: T.Buffer((N,), "float32")):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        for n in T.serial(N):
            pooled = T.alloc_buffer((C + LANES,), "float32")
            acc = T.alloc_buffer((LANES,), "float32")
            # the mean over positions: 16 channels at a time (whole vectors), then the channels left
            for cb in T.serial(CB):
                for lane in T.vectorized(LANES):
                    acc[lane] = T.float32(0)
                for p in T.serial(P):
                    for lane in T.vectorized(LANES):
                        acc[lane] = acc[lane] + at(x, n, cb * LANES + lane, p)
                for lane in T.vectorized(LANES):
                    pooled[cb * LANES + lane] = acc[lane] / T.float32(P)
            for ct in T.serial(CT):
                acc[0] = T.float32(0)
                for p in T.serial(P):
                    acc[0] = acc[0] + at(x, n, CB * LANES + ct, p)
                pooled[CB * LANES + ct] = acc[0] / T.float32(P)
            if NORM:  # LayerNorm over the channels: mean, biased variance, then the affine
                acc[0] = T.float32(0)
                for c in T.serial(C):
                    acc[0] = acc[0] + pooled[c]
                acc[1] = acc[0] / T.float32(C)
                acc[0] = T.float32(0)
                for c in T.serial(C):
                    acc[0] = acc[0] + (pooled[c] - acc[1]) * (pooled[c] - acc[1])
                acc[2] = T.float32(1) / T.sqrt(acc[0] / T.float32(C) + T.float32(EPS))
                for c in T.serial(C):
                    pooled[c] = (pooled[c] - acc[1]) * acc[2] * gamma[c] + beta[c]
            # the linear: 16 classes at a time, one vector of accumulators
            for kb in T.serial(K16 // LANES):
                for lane in T.vectorized(LANES):
                    acc[lane] = bias[kb * LANES + lane]
                for c in T.serial(C):
                    for lane in T.vectorized(LANES):
                        acc[lane] = acc[lane] + pooled[c] * wt[c, kb * LANES + lane]
                for lane in T.serial(LANES):
                    if kb * LANES + lane < k:
                        logits[n, kb * LANES + lane] = acc[lane]
            # the largest softmax probability: 1 / Σ exp(z - max z)
            acc[0] = logits[n, 0]
            for j in T.serial(k):
                acc[0] = T.max(acc[0], logits[n, j])
            acc[1] = T.float32(0)
            for j in T.serial(k):
                acc[1] = acc[1] + T.exp(logits[n, j] - acc[0])
            conf[n] = T.float32(1) / acc[1]

    with _LOCK:
        return tvm.compile(tvm.IRModule({"main": main}), target=host_target()).jit()["main"]


def strides(x: torch.Tensor, lay: str) -> tuple[int, ...]:
    """The strides the kernel checks for ``x`` read in ``lay`` (PyTorch may give a dimension of size 1 any)."""
    if lay == "cl":
        n, c, h, w = x.shape
        return (h * w * c, 1, w * c, c)
    out, step = [], 1
    for size in reversed(x.shape):
        out.append(step)
        step *= size
    return tuple(reversed(out))


def head_kernel(x: torch.Tensor, k: int, eps: float | None) -> tuple[Any, str] | None:
    """(the compiled kernel, the layout it reads) for feature ``x`` and ``k`` classes, or None where the
    kernel does not apply: not on the CPU, neither float32 nor uint8, a layout it does not read, TVM missing or turned
    off. Compiled once per process for each shape (any batch) and layout."""
    if (not enabled() or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.uint8)
            or x.dim() not in (2, 3, 4)):
        return None
    lay = layout(x)
    if lay is None:
        return None
    try:
        return _build(x.dim(), tuple(x.shape[1:]), lay, int(k), None if eps is None else float(eps),
                      str(x.dtype).replace("torch.", "")), lay
    except Exception:  # noqa: BLE001 - no TVM, or it failed to compile: the head's own ops run
        return None

