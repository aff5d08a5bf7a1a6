"""Kernel templates as search spaces: each function declares one template's variables and constraints.

A template is stated once here, for one workload on one target: its tunable
variables with their domains, the constraints (each naming the limit it
expresses), the derived quantities the cost model and code generators read
(threads per block, shared-memory bytes, registers), and the numbers its
parameters stand for. Domains are generic (powers of two, small ranges); every
hardware limit enters as a parameter taken from the Target, never as a number
baked into a domain.

Two rules about the workload's extents, used throughout:

- ``_fits_exactly_or_masked`` (GPU block tiles): when the extent is a multiple
  of the smallest tile, tiles must divide it (no edge blocks); otherwise the edge
  block is masked and a tile must be smaller than twice the extent (``T < 2*X``:
  no block mostly empty).
- ``_fits_masked`` (CPU cache blocks, conv output patches): edges are always
  handled (packing pads them, masks cover them), so only ``T < 2*X``.

GPU matmul is the SIMT tiling (CUTLASS's and Triton's hierarchy): a block
computes BM x BN of C, looping over K in BK steps staged through shared memory
in a STAGES-deep pipeline; it is split into warps of WM x WN and each thread
owns a TM x TN accumulator tile. A and B are read with VEC-element vector loads.

GPU tensor-core matmul (``matmul_tensorcore_gpu``) keeps the block tile and the
pipeline, but a warp's WM x WN tile is whole MMA tiles (``TENSOR_CORE_MMA``) that
the warp computes together with ``mma.sync``: no thread tile, and the fragments
come from shared memory through ``ldmatrix``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sympy
from sympy import And, Eq, Ge, Gt, Le, Lt, Max, Mod, Or, ceiling

from optic import targets
from optic.targets import Target

from .space import Constraint, Space, SpaceError, Var, powers_of_two, range_, symbols

__all__ = [
    "SMEM_ROW_PAD_BYTES",
    "TEMPLATES",
    "TENSOR_CORE_MMA",
    "conv2d_cpu",
    "conv2d_direct_cpu",
    "conv2d_gpu",
    "depthwise_conv2d_cpu",
    "direct_copies_input",
    "direct_input_columns",
    "elementwise_cpu",
    "elementwise_gpu",
    "matmul_cpu",
    "matmul_gpu",
    "matmul_tensorcore_gpu",
    "reduction_cpu",
    "reduction_gpu",
    "template",
    "tensor_core_dtype",
]

_BYTES = {"float32": 4, "float": 4, "fp32": 4, "float16": 2, "half": 2, "fp16": 2,
          "bfloat16": 2, "bf16": 2, "int8": 1}  # fmt: skip

# Not in the Target tables because they are the same on every CUDA GPU, or are estimates of ours:
LOAD_BYTES = 16  # widest global/shared load per thread (128-bit: LDG.128, ld.global.v4.b32)
ACC_BYTES = 4  # accumulators are fp32 (fp16/bf16 GEMMs accumulate in fp32, as PyTorch's do)
REG_BASE = 32  # registers for addresses, indices, loop state and predicates: an estimate, not a count

EPILOGUES = ("bias", "residual", "relu", "relu6", "gelu", "silu", "tanh", "sigmoid")

c = Constraint  # short name: templates are lists of c(relation, "the limit it expresses")


def _bytes(dtype: Any) -> int:
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _BYTES:
        raise SpaceError(f"no template for dtype {dtype!r}; known: {sorted(_BYTES)}")
    return _BYTES[key]


def _target(target: str | Target, kind: str, fields: Sequence[str]) -> Target:
    t = targets.get(target)
    if t.kind != kind:
        raise SpaceError(f"target {t.name} is a {t.kind}; this template is for a {kind}")
    missing = [f for f in fields if getattr(t, f) is None]
    if missing:
        raise SpaceError(f"target {t.name} lacks {', '.join(missing)}, which this template needs")
    return t


def _epilogue(epilogue: Sequence[str]) -> tuple[str, ...]:
    unknown = [e for e in epilogue if e not in EPILOGUES]
    if unknown:
        raise SpaceError(f"unknown epilogue {unknown}; known: {list(EPILOGUES)}")
    return tuple(epilogue)


def _fits_exactly_or_masked(extent: Any, tile: sympy.Symbol, extent_value: int, smallest: int) -> Constraint:
    if extent_value % smallest == 0:
        return c(Eq(Mod(extent, tile), 0), f"{tile} divides the extent {extent}: no edge blocks")
    return c(Lt(tile, 2 * extent), f"edge blocks masked; {tile} under twice the extent {extent}")


def _fits_masked(extent: Any, tile: sympy.Symbol) -> Constraint:
    return c(Lt(tile, 2 * extent), f"edges handled; {tile} under twice the extent {extent}")


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise SpaceError(f"convolution output is empty: size {size}, kernel {kernel}, stride {stride}, "
                         f"padding {padding}, dilation {dilation}")
    return out


# -- GPU ---------------------------------------------------------------------------------------------

_GPU_FIELDS = ("smem_per_block", "max_threads_per_block", "warp_size", "regs_per_thread", "regs_per_sm")
SMEM, MAX_THREADS, WARP, REGS, REGS_SM, BYTES, LOAD, ACC, RBASE = symbols(
    "SMEM MAX_THREADS WARP REGS REGS_SM BYTES LOAD_BYTES ACC_BYTES REG_BASE")


def _gpu_params(t: Target, dtype: Any) -> dict[str, int]:
    return dict(SMEM=t.smem_per_block, MAX_THREADS=t.max_threads_per_block, WARP=t.warp_size,
                REGS=t.regs_per_thread, REGS_SM=t.regs_per_sm, BYTES=_bytes(dtype), LOAD_BYTES=LOAD_BYTES,
                ACC_BYTES=ACC_BYTES, REG_BASE=REG_BASE)


def _gemm_gpu(epilogue: tuple[str, ...], a_vector: bool, b_contiguous: str, gemm_k: Any):
    """Block/warp/thread tiling, shared-memory pipeline and vector loads of a GPU GEMM (the extents'
    fits are the caller's). ``a_vector``: A is read with VEC-wide loads (K contiguous); ``b_contiguous``:
    the dimension of B that is contiguous in memory ("k" for nn.Linear weights, "n" for a K x N matrix)."""
    BM, BN, BK, WM, WN, TM, TN, STAGES, VEC = symbols("BM BN BK WM WN TM TN STAGES VEC")
    variables = [
        Var("BM", powers_of_two(16, 256)), Var("BN", powers_of_two(16, 256)), Var("BK", powers_of_two(16, 128)),
        Var("WM", powers_of_two(8, 256)), Var("WN", powers_of_two(8, 256)),
        Var("TM", powers_of_two(1, 16)), Var("TN", powers_of_two(1, 16)),
        Var("STAGES", range_(1, 6)), Var("VEC", powers_of_two(1, 16)),
    ]
    threads = BM * BN / (TM * TN)
    smem = STAGES * (BM * BK + BK * BN) * BYTES
    # Registers per thread: fp32 accumulators, the A and B fragments of a k step double-buffered in the
    # input dtype (packed 32-bit registers), what the epilogue holds, and REG_BASE.
    regs = TM * TN * ACC / 4 + 2 * (TM + TN) * BYTES / 4 + RBASE
    if "bias" in epilogue:
        regs += TN * ACC / 4  # one bias value per output column of the thread tile
    if "residual" in epilogue:
        regs += TM * TN * BYTES / 4  # the residual tile, in the input dtype
    a_vec = VEC if a_vector else 1
    constraints = [
        c(Eq(Mod(BM, WM), 0), "warp tiles partition the block tile along M"),
        c(Eq(Mod(BN, WN), 0), "warp tiles partition the block tile along N"),
        c(Eq(Mod(WM, TM), 0), "thread tiles partition the warp tile along M"),
        c(Eq(Mod(WN, TN), 0), "thread tiles partition the warp tile along N"),
        c(Eq((WM / TM) * (WN / TN), WARP), "a warp's threads cover its warp tile exactly"),
        c(Le(threads, MAX_THREADS), "threads per block"),
        c(Eq(Mod(threads, WARP), 0), "a block is whole warps"),
        c(Le(smem, SMEM), "shared memory per block: STAGES copies of the A and B tiles"),
        c(Le(BM * BN * ACC, SMEM), "shared memory per block: the epilogue stages the C tile for coalesced stores"),
        c(Le(regs, REGS), "registers per thread"),
        c(Le(threads * regs, REGS_SM), "registers per SM: one block must fit"),
        c(Le(VEC * BYTES, LOAD), "widest vector load"),
        c(Eq(Mod(BK, VEC), 0), "vector loads of A (and K-major B) stay inside the K tile"),
        c(Eq(Mod(BM * BK, threads * a_vec), 0), "the A tile splits into equal per-thread loads"),
        c(Eq(Mod(BK * BN, threads * VEC), 0), "the B tile splits into equal per-thread vector loads"),
        c(Le(STAGES, ceiling(gemm_k / BK)), "pipeline no deeper than the K loop"),
    ]
    if b_contiguous == "n":
        constraints.append(c(Eq(Mod(BN, VEC), 0), "vector loads of N-major B stay inside the N tile"))
    elif b_contiguous != "k":
        raise SpaceError(f"b_contiguous is 'k' or 'n', not {b_contiguous!r}")
    derived = {"threads": threads, "warps": (BM / WM) * (BN / WN), "smem_bytes": smem, "regs_per_thread": regs}
    return variables, constraints, derived


def matmul_gpu(M: int, N: int, K: int, target: str | Target, dtype: Any = "float16",
               epilogue: Sequence[str] = (), b_contiguous: str = "k") -> Space:
    """Tiled GEMM ``C[M, N] = A[M, K] @ B`` on a GPU, with an optional fused epilogue
    (``bias``, ``residual`` add, an activation). ``b_contiguous="k"`` is an nn.Linear weight (N x K)."""
    t = _target(target, "gpu", _GPU_FIELDS)
    epilogue = _epilogue(epilogue)
    Ms, Ns, Ks = symbols("M N K")
    variables, constraints, derived = _gemm_gpu(epilogue, True, b_contiguous, Ks)
    BM, BN, BK = symbols("BM BN BK")
    constraints = [
        _fits_exactly_or_masked(Ms, BM, M, 16),
        _fits_exactly_or_masked(Ns, BN, N, 16),
        _fits_exactly_or_masked(Ks, BK, K, 16),
        *constraints,
    ]
    derived["blocks"] = ceiling(Ms / BM) * ceiling(Ns / BN)
    return Space(f"matmul_gpu[{t.name}]", variables, constraints, {"M": M, "N": N, "K": K, **_gpu_params(t, dtype)},
                 derived, {"op": "matmul", "target": t.name, "dtype": str(dtype), "epilogue": epilogue,
                           "b_contiguous": b_contiguous})


# The tensor-core tile of each input dtype: (M, N, K) of the tile one warp's instruction pair computes
# (TVM's intrinsics issue two ``mma.sync.m16n8kK`` per 16 x 16 tile of C), and the accumulator's dtype.
# bfloat16 is absent: TVM 0.27 registers no bf16 ldmatrix or mma intrinsic (``tensor_intrin/cuda.py``).
TENSOR_CORE_MMA: dict[str, tuple[tuple[int, int, int], str]] = {
    "float16": ((16, 16, 16), "float32"), "int8": ((16, 16, 32), "int32"),
}  # fmt: skip
SMEM_ROW_PAD_BYTES = 16  # each shared-memory row of A and B is padded by 16 bytes: ldmatrix's 8 rows hit 8 bank groups


def tensor_core_dtype(dtype: Any) -> str:
    """``dtype``'s canonical name when tensor cores take it (``TENSOR_CORE_MMA``); ``SpaceError`` otherwise."""
    key = str(dtype).removeprefix("torch.").lower()
    key = {"fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(key, key)
    if key not in TENSOR_CORE_MMA:
        why = (" (TVM 0.27 has no bf16 ldmatrix/mma intrinsic)" if key == "bfloat16" else "")
        raise SpaceError(f"tensor-core GEMMs take {' or '.join(TENSOR_CORE_MMA)}, not {dtype}{why}")
    return key


def matmul_tensorcore_gpu(M: int, N: int, K: int, target: str | Target, dtype: Any = "float16",
                          epilogue: Sequence[str] = (), b_contiguous: str = "k") -> Space:
    """Tensor-core GEMM ``C[M, N] = epilogue(A[M, K] @ B)`` on a GPU (``mma.sync``, sm_80 and later).

    A block computes BM x BN of C in warps of WM x WN, each warp whole MMA tiles (MMA_M x MMA_N,
    MMA_K deep, fixed by ``dtype``: ``TENSOR_CORE_MMA``); K is walked in BK steps through a
    STAGES-deep ring of shared-memory tiles filled by VEC-element (``cp.async``) copies, each row
    padded by ``SMEM_ROW_PAD_BYTES``. The accumulators are fp32 (int32 for int8); the epilogue
    stages them through shared memory (the C tile reuses the ring's memory) and writes C in the
    element type (int8: the int32 accumulator, no epilogue: requantization is the int8 kernels').

    Extents must be multiples of the tiles (no masked edges: an operator pads M, N and K to a
    multiple of 16, or 32 for int8's K, before it can use this template); ``b_contiguous="k"``
    is an nn.Linear weight (B[N, K]), ``"n"`` a K x N matrix."""
    t = _target(target, "gpu", _GPU_FIELDS)
    d = tensor_core_dtype(dtype)
    epilogue = _epilogue(epilogue)
    if d == "int8" and epilogue:
        raise SpaceError("an int8 tensor-core GEMM returns the int32 accumulator; it fuses no epilogue")
    if t.compute_capability is None or t.compute_capability < (8, 0):
        raise SpaceError(f"{t.name} has no mma.sync tensor cores for this template (it needs sm_80 or later)")
    (mma_m, mma_n, mma_k), _ = TENSOR_CORE_MMA[d]
    Ms, Ns, Ks = symbols("M N K")
    BM, BN, BK, WM, WN, STAGES, VEC = symbols("BM BN BK WM WN STAGES VEC")
    MMA_M, MMA_N, MMA_K, PAD = symbols("MMA_M MMA_N MMA_K PAD")
    variables = [
        Var("BM", powers_of_two(16, 256)), Var("BN", powers_of_two(16, 256)), Var("BK", powers_of_two(16, 128)),
        Var("WM", powers_of_two(16, 256)), Var("WN", powers_of_two(16, 256)),
        Var("STAGES", range_(1, 6)), Var("VEC", powers_of_two(1, 16)),
    ]
    warps = (BM / WM) * (BN / WN)
    threads = warps * WARP
    if b_contiguous == "k":
        smem_tiles = STAGES * (BM + BN) * (BK + PAD) * BYTES  # A[BM, BK] and B[BN, BK], rows padded
        b_row = BK
    elif b_contiguous == "n":
        smem_tiles = STAGES * (BM * (BK + PAD) + BK * (BN + PAD)) * BYTES  # B[BK, BN]
        b_row = BN
    else:
        raise SpaceError(f"b_contiguous is 'k' or 'n', not {b_contiguous!r}")
    smem_c = BM * BN * ACC  # the accumulator tile staged for the epilogue (reuses the tiles' memory)
    # Registers per thread: a warp's accumulators spread over its 32 threads, the A and B fragments of
    # an MMA_K step double-buffered (ptxas loads the next step's under this one's MMAs; packed 32-bit
    # registers), an address for each vector copy the thread issues per K tile, and REG_BASE; the
    # epilogue's values are transient. (Without the copies' term, WM=128, WN=32 with 2-element
    # copies passed at 240 and ptxas needed more than 255.)
    regs = (WM * WN * ACC / (4 * WARP) + 2 * (WM + WN) * MMA_K * BYTES / (4 * WARP)
            + (BM + BN) * BK / (threads * VEC) + RBASE)
    constraints = [
        c(Eq(Mod(Ms, BM), 0), "BM divides M: no masked edges"),
        c(Eq(Mod(Ns, BN), 0), "BN divides N: no masked edges"),
        c(Eq(Mod(Ks, BK), 0), "BK divides K: no masked edges"),
        c(Eq(Mod(BM, WM), 0), "warp tiles partition the block tile along M"),
        c(Eq(Mod(BN, WN), 0), "warp tiles partition the block tile along N"),
        c(Eq(Mod(WM, MMA_M), 0), "a warp tile is whole MMA tiles along M"),
        c(Eq(Mod(WN, MMA_N), 0), "a warp tile is whole MMA tiles along N"),
        c(Eq(Mod(BK, MMA_K), 0), "the K tile is whole MMA steps"),
        c(Le(threads, MAX_THREADS), "threads per block"),
        c(Le(smem_tiles, SMEM), "shared memory per block: STAGES copies of the A and B tiles"),
        c(Le(smem_c, SMEM), "shared memory per block: the C tile staged for the epilogue"),
        c(Le(regs, REGS), "registers per thread"),
        c(Le(threads * regs, REGS_SM), "registers per SM: one block must fit"),
        c(Le(VEC * BYTES, LOAD), "widest vector load"),
        c(Ge(VEC * BYTES, 4), "cp.async copies 4, 8 or 16 bytes"),
        c(Eq(Mod(BK, VEC), 0), "vector copies of A stay inside the K tile"),
        c(Eq(Mod(b_row, VEC), 0), "vector copies of B stay inside its contiguous tile row"),
        c(Eq(Mod(BM * BK, threads * VEC), 0), "the A tile splits into equal per-thread vector copies"),
        c(Eq(Mod(BK * BN, threads * VEC), 0), "the B tile splits into equal per-thread vector copies"),
        c(Le(STAGES, Ks / BK), "pipeline no deeper than the K loop"),
    ]
    derived = {"threads": threads, "warps": warps, "smem_tiles": smem_tiles, "smem_c": smem_c,
               "smem_bytes": Max(smem_tiles, smem_c), "regs_per_thread": regs,
               "blocks": (Ms / BM) * (Ns / BN)}
    params = {"M": M, "N": N, "K": K, "MMA_M": mma_m, "MMA_N": mma_n, "MMA_K": mma_k,
              "PAD": SMEM_ROW_PAD_BYTES // _bytes(d), **_gpu_params(t, d)}
    return Space(f"matmul_tensorcore_gpu[{t.name}]", variables, constraints, params, derived,
                 {"op": "matmul", "target": t.name, "dtype": d, "epilogue": epilogue,
                  "b_contiguous": b_contiguous, "accumulator": TENSOR_CORE_MMA[d][1]})


def conv2d_gpu(N: int, C: int, H: int, W: int, F: int, R: int, S: int, target: str | Target, *,
               stride: int = 1, padding: int = 0, dilation: int = 1, dtype: Any = "float16",
               layout: str = "NHWC", epilogue: Sequence[str] = ()) -> Space:
    """2-D convolution as an implicit GEMM on a GPU: M = output pixels, N = F filters, K = C*R*S.

    A block computes a TOH x TOW patch of output pixels (``BM == TOH*TOW``) for BN filters. The
    template prefers NHWC: channels are contiguous, so A (the gathered input) is read with vector
    loads along C. With NCHW the gather is scalar and only the weights are read with vector loads.
    """
    if layout not in ("NHWC", "NCHW"):
        raise SpaceError(f"conv2d_gpu layout is 'NHWC' or 'NCHW', not {layout!r}")
    t = _target(target, "gpu", _GPU_FIELDS)
    epilogue = _epilogue(epilogue)
    oh, ow = (_out_size(x, k, stride, padding, dilation) for x, k in ((H, R), (W, S)))
    Cs, Rs, Ss, Fs, OH, OW = symbols("C R S F OH OW")
    variables, constraints, derived = _gemm_gpu(epilogue, layout == "NHWC", "k", Cs * Rs * Ss)
    BM, BN, BK, VEC, TOH, TOW = symbols("BM BN BK VEC TOH TOW")
    variables += [Var("TOH", powers_of_two(1, 64)), Var("TOW", powers_of_two(1, 64))]
    constraints = [
        c(Eq(BM, TOH * TOW), "a block's M tile is a TOH x TOW patch of output pixels"),
        _fits_exactly_or_masked(OH, TOH, oh, 8),
        _fits_exactly_or_masked(OW, TOW, ow, 8),
        _fits_exactly_or_masked(Fs, BN, F, 16),
        _fits_exactly_or_masked(Cs * Rs * Ss, BK, C * R * S, 16),
        *constraints,
    ]
    if layout == "NHWC":
        constraints.append(c(Eq(Mod(Cs, VEC), 0), "NHWC: a vector load stays within one pixel's channels"))
    derived["blocks"] = N * ceiling(OH / TOH) * ceiling(OW / TOW) * ceiling(Fs / BN)
    params = {"C": C, "R": R, "S": S, "F": F, "OH": oh, "OW": ow, **_gpu_params(t, dtype)}
    meta = {"op": "conv2d", "target": t.name, "dtype": str(dtype), "layout": layout, "epilogue": epilogue,
            "shape": dict(N=N, C=C, H=H, W=W, F=F, R=R, S=S, stride=stride, padding=padding, dilation=dilation)}
    return Space(f"conv2d_gpu[{t.name}]", variables, constraints, params, derived, meta)


def elementwise_gpu(numel: int, target: str | Target, *, dtype: Any = "float16", inputs: int = 1) -> Space:
    """An elementwise (injective) kernel over ``numel`` elements reading ``inputs`` tensors and writing one:
    THREADS per block, EPT elements per thread, read and written VEC at a time."""
    t = _target(target, "gpu", _GPU_FIELDS)
    THREADS, EPT, VEC, NUMEL, INPUTS = symbols("THREADS EPT VEC NUMEL INPUTS")
    regs = EPT * (INPUTS + 1) * BYTES / 4 + RBASE  # the thread's elements in flight, packed
    constraints = [
        c(Le(THREADS, MAX_THREADS), "threads per block"),
        c(Eq(Mod(THREADS, WARP), 0), "a block is whole warps"),
        c(Le(VEC * BYTES, LOAD), "widest vector load"),
        c(Eq(Mod(EPT, VEC), 0), "a thread's elements are whole vectors"),
        c(Eq(Mod(NUMEL, VEC), 0), "vector loads need no scalar tail"),
        _fits_masked(NUMEL, THREADS * EPT),
        c(Le(regs, REGS), "registers per thread"),
        c(Le(THREADS * regs, REGS_SM), "registers per SM: one block must fit"),
    ]
    variables = [Var("THREADS", powers_of_two(32, 2048)), Var("EPT", powers_of_two(1, 32)),
                 Var("VEC", powers_of_two(1, 16))]
    derived = {"blocks": ceiling(NUMEL / (THREADS * EPT)), "regs_per_thread": regs}
    return Space(f"elementwise_gpu[{t.name}]", variables, constraints,
                 {"NUMEL": numel, "INPUTS": inputs, **_gpu_params(t, dtype)}, derived,
                 {"op": "elementwise", "target": t.name, "dtype": str(dtype)})


def _reduction_kind(kind: str) -> int:
    """Partial results per row that a reduction combines: softmax's max then sum reuse one slot;
    layer norm combines mean and sum of squares (Welford) together."""
    partials = {"softmax": 1, "layernorm": 2}
    if kind not in partials:
        raise SpaceError(f"reduction kind is one of {sorted(partials)}, not {kind!r}")
    return partials[kind]


def reduction_gpu(rows: int, cols: int, target: str | Target, *, kind: str = "softmax",
                  dtype: Any = "float16") -> Space:
    """A row reduction with a normalising epilogue (softmax, layer norm) over the last dimension:
    TPR threads per row, RPB rows per block, VEC-wide loads."""
    t = _target(target, "gpu", _GPU_FIELDS)
    TPR, RPB, VEC, ROWS, COLS, PARTIALS = symbols("TPR RPB VEC ROWS COLS PARTIALS")
    threads = TPR * RPB
    smem = RPB * ceiling(TPR / WARP) * PARTIALS * ACC  # one fp32 partial per warp and row
    constraints = [
        c(Le(threads, MAX_THREADS), "threads per block"),
        c(Eq(Mod(threads, WARP), 0), "a block is whole warps"),
        c(Or(Eq(Mod(WARP, TPR), 0), Eq(Mod(TPR, WARP), 0)),
          "a row's threads are part of one warp (shuffles only) or whole warps (shuffles, then shared memory)"),
        c(Le(smem, SMEM), "shared memory per block: the per-warp partials"),
        c(Le(VEC * BYTES, LOAD), "widest vector load"),
        # the fp32 partial statistics are VEC-wide vectors too: 8 fp32 lanes (an fp16 row read 8 wide) is a
        # 32-byte vector, which CUDA has no type for (TVM writes a make_ulonglong4 of 8 floats; nvcc refuses it)
        c(Le(VEC * ACC, LOAD), "widest vector of the fp32 partial statistics"),
        c(Eq(Mod(COLS, VEC), 0), "vector loads need no scalar tail"),
        _fits_masked(COLS, TPR * VEC),
        _fits_masked(ROWS, RPB),
    ]
    variables = [Var("TPR", powers_of_two(1, 1024)), Var("RPB", powers_of_two(1, 64)),
                 Var("VEC", powers_of_two(1, 16))]
    derived = {"threads": threads, "smem_bytes": smem, "blocks": ceiling(ROWS / RPB)}
    params = {"ROWS": rows, "COLS": cols, "PARTIALS": _reduction_kind(kind), **_gpu_params(t, dtype)}
    return Space(f"reduction_gpu[{t.name}]", variables, constraints, params, derived,
                 {"op": kind, "target": t.name, "dtype": str(dtype)})


# -- CPU ---------------------------------------------------------------------------------------------

_CPU_FIELDS = ("cores", "vector_bits", "l1d_bytes", "l2_bytes", "isa")
LANES, VREGS, L1, L2, L3, CORES = symbols("LANES VREGS L1 L2 L3 CORES")


def _vector_registers(t: Target) -> int:
    """Architectural SIMD registers: 32 with AVX-512 (zmm0-31) and on AArch64 (v0-v31), else 16 (ymm0-15)."""
    return 32 if t.isa & {"avx512f", "neon", "asimd", "sve"} else 16


def _cpu_params(t: Target, dtype: Any) -> dict[str, int]:
    # Templates compute in fp32 (LANES fp32 elements per register); BYTES is the storage size.
    # Without an L3, the cores' L2s together hold what would be shared.
    return dict(LANES=t.vector_lanes_fp32, VREGS=_vector_registers(t), L1=t.l1d_bytes, L2=t.l2_bytes,
                L3=t.l3_bytes or t.l2_bytes * t.cores, CORES=t.cores, BYTES=_bytes(dtype))


def _fits_vector_masked(extent: Any, tile: sympy.Symbol, register_tile: sympy.Symbol) -> Constraint:
    """``_fits_masked`` for a block of whole vectors: an extent under half a vector takes one masked vector."""
    return c(Or(Lt(tile, 2 * extent), And(Eq(tile, register_tile), Eq(register_tile, LANES))),
             f"edges handled; {tile} under twice the extent {extent}, or one vector for an extent under half of one")


def _gemm_cpu(MC: Any, gemm_m: Any, gemm_n: Any, gemm_k: Any, epilogue: tuple[str, ...], k_extent: int):
    """BLIS-style GEMM blocking: an MR x NR register tile, KC x NR micro-panels of B in L1 (or L2 when a
    single k block covers K), an MC x KC block of A in L2, a KC x NC panel of B in L3; PARALLEL threads
    share the macro tiles."""
    MR, NR, KC, NC, UNROLL, PARALLEL = symbols("MR NR KC NC UNROLL PARALLEL")
    vregs = MR * NR / LANES + NR / LANES + 1  # accumulators, one row of B, one broadcast A value
    if "bias" in epilogue:
        vregs += NR / LANES  # the bias vectors stay loaded across the rows of a tile
    constraints = [
        c(Eq(Mod(NR, LANES), 0), "the register tile's N side is whole vectors"),
        c(Le(vregs, VREGS), "vector registers"),
        # One k block covering K keeps the accumulators in registers from zero to the store, which
        # measured faster than L1-sized k blocks that reload them (5% on a 512^3 GEMM): its
        # micro-panels may stream from L2 instead.
        c(Or(Le((MR + NR) * KC * BYTES, L1), And(Ge(KC, gemm_k), Le((MR + NR) * KC * BYTES, L2 / 2))),
          "L1: the A and B micro-panels of one k block (L2 when one k block covers K)"),
        c(Le(MC * KC * BYTES, L2), "L2: the packed A block"),
        c(Le(KC * NC * BYTES, L3), "L3 (or all cores' L2): the packed B panel"),
        c(Eq(Mod(MC, MR), 0), "the A block is whole register tiles"),
        c(Eq(Mod(NC, NR), 0), "the B panel is whole register tiles"),
        c(Eq(Mod(KC, UNROLL), 0), "the k loop unrolls evenly"),
        c(Eq(Mod(CORES, PARALLEL), 0), "threads split the cores evenly"),
        c(Ge(ceiling(gemm_m / MC) * ceiling(gemm_n / NC), PARALLEL), "a macro tile for every thread"),
        c(Or(Ge(KC, 16), Ge(KC, gemm_k)), "k blocks under 16 only when K is that small"),
    ]
    variables = [
        # KC: powers of two, and K itself, so that one unpadded k block can cover it (K = 768, 576, ...)
        Var("MR", range_(1, 17)), Var("NR", powers_of_two(4, 128)),
        Var("KC", tuple(sorted({*powers_of_two(1, 2048), *([k_extent] if k_extent <= 4096 else [])}))),
        Var("NC", powers_of_two(16, 8192)), Var("UNROLL", powers_of_two(1, 8)), Var("PARALLEL", range_(1, 257)),
    ]
    derived = {"vector_registers": vregs, "l1_bytes": (MR + NR) * KC * BYTES, "l2_bytes": MC * KC * BYTES,
               "l3_bytes": KC * NC * BYTES}
    return variables, constraints, derived


def matmul_cpu(M: int, N: int, K: int, target: str | Target = "cpu", dtype: Any = "float32",
               epilogue: Sequence[str] = ()) -> Space:
    """Blocked, vectorised GEMM on a CPU (fp32 compute), with an optional fused epilogue."""
    t = _target(target, "cpu", _CPU_FIELDS)
    epilogue = _epilogue(epilogue)
    Ms, Ns, Ks, MC, NC, KC = symbols("M N K MC NC KC")
    variables, constraints, derived = _gemm_cpu(MC, Ms, Ns, Ks, epilogue, K)
    NR = symbols("NR")[0]
    variables.insert(3, Var("MC", (*range_(1, 16), *range_(16, 1025, 16))))
    constraints = [_fits_masked(Ms, MC), _fits_vector_masked(Ns, NC, NR), _fits_masked(Ks, KC),
                   c(Or(Ge(MC, 16), Ge(MC, Ms)), "blocks of fewer than 16 rows only when M is that small"),
                   *constraints]
    return Space(f"matmul_cpu[{t.name}]", variables, constraints, {"M": M, "N": N, "K": K, **_cpu_params(t, dtype)},
                 derived, {"op": "matmul", "target": t.name, "dtype": str(dtype), "epilogue": epilogue})


def conv2d_cpu(N: int, C: int, H: int, W: int, F: int, R: int, S: int, target: str | Target = "cpu", *,
               stride: int = 1, padding: int = 0, dilation: int = 1, dtype: Any = "float32",
               layout: str = "NHWC", epilogue: Sequence[str] = ()) -> Space:
    """2-D convolution as an implicit GEMM on a CPU: M = output pixels, N = F filters (in vector
    lanes), K = C*R*S. A macro tile is TOH whole output rows (``MC = TOH*OW``). The template prefers
    NHWC (an im2col row is contiguous runs of C); with NCHW the packing gathers strided pixels, which
    costs time but changes no constraint."""
    if layout in ("NCHWc", "NHWCc"):
        return conv2d_direct_cpu(N, C, H, W, F, R, S, target, stride=stride, padding=padding, dilation=dilation,
                                 dtype=dtype, layout=layout, epilogue=epilogue)
    if layout not in ("NHWC", "NCHW"):
        raise SpaceError(f"conv2d_cpu layout is 'NHWC', 'NCHW', 'NCHWc' or 'NHWCc', not {layout!r}")
    t = _target(target, "cpu", _CPU_FIELDS)
    epilogue = _epilogue(epilogue)
    oh, ow = (_out_size(x, k, stride, padding, dilation) for x, k in ((H, R), (W, S)))
    Cs, Rs, Ss, Fs, OH, OW, TOH, NC, KC = symbols("C R S F OH OW TOH NC KC")
    variables, constraints, derived = _gemm_cpu(TOH * OW, N * OH * OW, Fs, Cs * Rs * Ss, epilogue, C * R * S)
    NR = symbols("NR")[0]
    variables.insert(3, Var("TOH", powers_of_two(1, 256)))
    constraints = [_fits_masked(OH, TOH), _fits_vector_masked(Fs, NC, NR), _fits_masked(Cs * Rs * Ss, KC),
                   *constraints]
    derived["MC"] = TOH * OW
    params = {"C": C, "R": R, "S": S, "F": F, "OH": oh, "OW": ow, **_cpu_params(t, dtype)}
    meta = {"op": "conv2d", "target": t.name, "dtype": str(dtype), "layout": layout, "epilogue": epilogue,
            "shape": dict(N=N, C=C, H=H, W=W, F=F, R=R, S=S, stride=stride, padding=padding, dilation=dilation)}
    return Space(f"conv2d_cpu[{t.name}]", variables, constraints, params, derived, meta)


def direct_input_columns(shape: Mapping[str, int], reg_n: Any) -> Any:
    """Input columns the direct convolution's register tiles read per row (padded coordinates): OW rounded
    up to whole tiles of REG_N, and the window. ``shape``: a conv's sizes by name (``meta["shape"]``);
    ``reg_n``: an int or a numpy array of them."""
    ow = _out_size(shape["W"], shape["S"], shape["stride"], shape["padding"], shape["dilation"])
    return (-(-ow // reg_n) * reg_n - 1) * shape["stride"] + (shape["S"] - 1) * shape["dilation"] + 1


def direct_copies_input(shape: Mapping[str, int], reg_n: Any) -> Any:
    """Whether the direct convolution copies its input into padded channel blocks (else it reads NCHW in
    place): with zero padding, or where the last register tile's columns reach beyond W."""
    return (shape["padding"] > 0) | (direct_input_columns(shape, reg_n) > shape["W"])


def conv2d_direct_cpu(N: int, C: int, H: int, W: int, F: int, R: int, S: int, target: str | Target = "cpu", *,
                      stride: int = 1, padding: int = 0, dilation: int = 1, dtype: Any = "float32",
                      layout: str = "NCHWc", epilogue: Sequence[str] = ()) -> Space:
    """2-D convolution computed directly (no im2col) on blocks of channels, NCHW[x]c (NeoCPU, Liu et al.,
    USENIX ATC'19): the weights are packed once, when the kernel is made, into
    ``[F/OC_BN, C/IC_BN, R, S, IC_BN, OC_BN]``; the input is read in place, or copied into padded blocks
    ``[N, C/IC_BN, H+2p, W', IC_BN]`` where zeros must surround it (:func:`direct_copies_input`);
    a register tile is REG_N output columns x OC_BN filters (OC_BN/LANES vectors each), accumulated
    over (input-channel block, kh, kw, channel in block), one broadcast input value times a weight
    vector per FMA (UNROLL_KW=2: kw unrolled outside the channel loop, 1: the channel loop outside a
    rolled kw). Tasks are (image, filter block, output row), PARALLEL threads. The tensors the
    kernel exchanges with the model stay NCHW (layout "NCHWc") or NHWC ("NHWCc": the input copy is then a
    transpose-free block copy, and the output's filter blocks are contiguous runs): the blocking is the
    kernel's own."""
    t = _target(target, "cpu", _CPU_FIELDS)
    epilogue = _epilogue(epilogue)
    oh, ow = (_out_size(x, k, stride, padding, dilation) for x, k in ((H, R), (W, S)))
    IC_BN, OC_BN, REG_N, UNROLL_KW, PARALLEL = symbols("IC_BN OC_BN REG_N UNROLL_KW PARALLEL")
    Cs, Fs, Rs, Ss, OH, OW, Ns, STRIDE, DIL = symbols("C F R S OH OW N STRIDE DIL")
    vec_oc = ceiling(OC_BN / LANES)  # a block narrower than a vector still takes a register
    vregs = REG_N * vec_oc + vec_oc + 1  # accumulators, one weight vector per lane block, one broadcast
    window = (REG_N - 1) * STRIDE + (Ss - 1) * DIL + 1  # input columns one tile reads per row
    l1_set = (Rs * Ss * IC_BN * OC_BN + Rs * window * IC_BN) * BYTES
    tasks = Ns * ceiling(Fs / OC_BN) * OH
    constraints = [
        c(Eq(Mod(Cs, IC_BN), 0), "input-channel blocks divide C (the input copy has no partial block)"),
        c(Or(Eq(Mod(OC_BN, LANES), 0), Le(Fs, OC_BN)),
          "a filter block is whole vectors, or one partial vector holding all F filters"),
        c(Lt(OC_BN, 2 * Fs), "edges handled; a filter block under twice F (the packed weights pad F)"),
        c(Lt(REG_N, 2 * OW), "edges handled; REG_N under twice OW (padded columns are computed and dropped)"),
        c(Le(vregs, VREGS), "vector registers: the REG_N x OC_BN accumulators, a weight row, a broadcast"),
        c(Le(l1_set, L1), "L1: one channel block's weights and the input rows they multiply"),
        c(Or(Eq(UNROLL_KW, 1), Gt(Ss, 1)), "kw is unrolled only where the window has several columns"),
        c(Eq(Mod(CORES, PARALLEL), 0), "threads split the cores evenly"),
        c(Ge(tasks, PARALLEL), "a task (image, filter block, output row) for every thread"),
    ]
    divisors = tuple(d for d in range(1, min(C, 256) + 1) if C % d == 0 and (d == C or d <= 64))
    variables = [Var("IC_BN", divisors), Var("OC_BN", (4, 8, 16, 24, 32, 48, 64)), Var("REG_N", range_(1, 33)),
                 Var("UNROLL_KW", (1, 2)), Var("PARALLEL", range_(1, 257))]
    params = {"N": N, "C": C, "F": F, "R": R, "S": S, "OH": oh, "OW": ow, "STRIDE": stride, "DIL": dilation,
              **_cpu_params(t, dtype)}
    derived = {"vector_registers": vregs, "l1_bytes": l1_set, "tasks": tasks}
    meta = {"op": "conv2d", "target": t.name, "dtype": str(dtype), "layout": layout, "epilogue": epilogue,
            "shape": dict(N=N, C=C, H=H, W=W, F=F, R=R, S=S, stride=stride, padding=padding, dilation=dilation)}
    return Space(f"conv2d_direct_cpu[{t.name}]", variables, constraints, params, derived, meta)


def depthwise_conv2d_cpu(N: int, C: int, H: int, W: int, R: int, S: int, target: str | Target = "cpu", *,
                         stride: int = 1, padding: int = 0, dilation: int = 1, dtype: Any = "float32",
                         epilogue: Sequence[str] = ()) -> Space:
    """Depthwise 2-D convolution (one R x S filter per channel, ``groups = C``) on NHWC, channels in vector
    lanes: a register tile is RW output columns x CB channels (CB/LANES vectors each), accumulated over the
    R*S taps, each tap a vector load of the input and one of the weights (``[R, S, C]``) per FMA. Zero
    padding is a test per tap, not a copy. Tasks are (image, output row), PARALLEL threads; the epilogue is
    applied to the tile in registers."""
    t = _target(target, "cpu", _CPU_FIELDS)
    epilogue = _epilogue(epilogue)
    oh, ow = (_out_size(x, k, stride, padding, dilation) for x, k in ((H, R), (W, S)))
    CB, RW, PARALLEL = symbols("CB RW PARALLEL")
    Cs, Ns, OH, OW = symbols("C N OH OW")
    vec = ceiling(CB / LANES)  # a block narrower than a vector still takes a register
    vregs = RW * vec + 2 * vec  # accumulators, the tap's weight vectors, one input vector
    if "bias" in epilogue:
        vregs += vec
    constraints = [
        c(Eq(Mod(Cs, CB), 0), "channel blocks divide C (no partial block)"),
        c(Or(Eq(Mod(CB, LANES), 0), Eq(CB, Cs)), "a channel block is whole vectors, or all C channels"),
        c(Le(vregs, VREGS), "vector registers: the RW x CB accumulators, a weight row, an input vector"),
        c(Lt(RW, 2 * OW), "edges handled; RW under twice OW (padded columns are computed and dropped)"),
        c(Eq(Mod(CORES, PARALLEL), 0), "threads split the cores evenly"),
        c(Ge(Ns * OH, PARALLEL), "a task (image, output row) for every thread"),
    ]
    blocks = tuple(d for d in range(1, C + 1) if C % d == 0 and (d % 8 == 0 or d == C) and d <= 256)
    variables = [Var("CB", blocks), Var("RW", range_(1, 33)), Var("PARALLEL", range_(1, 257))]
    params = {"N": N, "C": C, "OH": oh, "OW": ow, **_cpu_params(t, dtype)}
    derived = {"vector_registers": vregs, "tasks": Ns * OH}
    meta = {"op": "depthwise_conv2d", "target": t.name, "dtype": str(dtype), "layout": "NHWC", "epilogue": epilogue,
            "shape": dict(N=N, C=C, H=H, W=W, F=C, R=R, S=S, stride=stride, padding=padding, dilation=dilation)}
    return Space(f"depthwise_conv2d_cpu[{t.name}]", variables, constraints, params, derived, meta)


def elementwise_cpu(numel: int, target: str | Target = "cpu", *, dtype: Any = "float32", inputs: int = 1) -> Space:
    """An elementwise (injective) loop: VEC elements a step, CHUNK elements a task, PARALLEL threads."""
    t = _target(target, "cpu", _CPU_FIELDS)
    VEC, CHUNK, PARALLEL, NUMEL, INPUTS = symbols("VEC CHUNK PARALLEL NUMEL INPUTS")
    constraints = [
        c(Eq(Mod(VEC, LANES), 0), "a step is whole vectors"),
        c(Le(VEC * (INPUTS + 1) / LANES, VREGS), "vector registers: one step's operands and result"),
        c(Eq(Mod(CHUNK, VEC), 0), "a task is whole steps"),
        c(Le(CHUNK * (INPUTS + 1) * BYTES, L2), "L2: a task's operands stay in its core's cache"),
        c(Or(Lt(CHUNK, 2 * NUMEL), And(Eq(CHUNK, VEC), Eq(VEC, LANES))),
          "edges handled; CHUNK under twice NUMEL, or one (masked) vector when there are fewer elements"),
        c(Or(Ge(CHUNK, 256), Ge(CHUNK, NUMEL)), "tasks under 256 elements only when there are that few"),
        c(Eq(Mod(CORES, PARALLEL), 0), "threads split the cores evenly"),
        c(Ge(ceiling(NUMEL / CHUNK), PARALLEL), "a chunk for every thread"),
    ]
    variables = [Var("VEC", powers_of_two(1, 512)), Var("CHUNK", powers_of_two(1, 2**20)),
                 Var("PARALLEL", range_(1, 257))]
    return Space(f"elementwise_cpu[{t.name}]", variables, constraints,
                 {"NUMEL": numel, "INPUTS": inputs, **_cpu_params(t, dtype)}, {"tasks": ceiling(NUMEL / CHUNK)},
                 {"op": "elementwise", "target": t.name, "dtype": str(dtype)})


def reduction_cpu(rows: int, cols: int, target: str | Target = "cpu", *, kind: str = "softmax",
                  dtype: Any = "float32") -> Space:
    """A row reduction with a normalising epilogue (softmax, layer norm): VEC elements a step,
    RPT rows a task, PARALLEL threads."""
    t = _target(target, "cpu", _CPU_FIELDS)
    VEC, RPT, PARALLEL, ROWS, COLS, PARTIALS = symbols("VEC RPT PARALLEL ROWS COLS PARTIALS")
    constraints = [
        c(Eq(Mod(VEC, LANES), 0), "a step is whole vectors"),
        c(Le(VEC / LANES * (PARTIALS + 1), VREGS), "vector registers: the partial accumulators and the loaded step"),
        c(Or(Lt(VEC, 2 * COLS), Eq(VEC, LANES)), "a row is more than half a step, or the step is one (masked) vector"),
        c(Le(RPT * COLS * BYTES, L2), "L2: a task's rows stay cached between the passes over them"),
        _fits_masked(ROWS, RPT),
        c(Eq(Mod(CORES, PARALLEL), 0), "threads split the cores evenly"),
        c(Ge(ceiling(ROWS / RPT), PARALLEL), "a task for every thread"),
    ]
    variables = [Var("VEC", powers_of_two(1, 512)), Var("RPT", powers_of_two(1, 4096)),
                 Var("PARALLEL", range_(1, 257))]
    params = {"ROWS": rows, "COLS": cols, "PARTIALS": _reduction_kind(kind), **_cpu_params(t, dtype)}
    return Space(f"reduction_cpu[{t.name}]", variables, constraints, params, {"tasks": ceiling(ROWS / RPT)},
                 {"op": kind, "target": t.name, "dtype": str(dtype)})


# -- by name -------------------------------------------------------------------------------------------

TEMPLATES: dict[tuple[str, str], Callable[..., Space]] = {
    ("matmul", "gpu"): matmul_gpu, ("matmul", "cpu"): matmul_cpu,
    ("matmul_tensorcore", "gpu"): matmul_tensorcore_gpu,
    ("conv2d", "gpu"): conv2d_gpu, ("conv2d", "cpu"): conv2d_cpu,
    ("depthwise_conv2d", "cpu"): depthwise_conv2d_cpu,
    ("elementwise", "gpu"): elementwise_gpu, ("elementwise", "cpu"): elementwise_cpu,
    ("reduction", "gpu"): reduction_gpu, ("reduction", "cpu"): reduction_cpu,
}  # fmt: skip


def template(op: str, *args: Any, target: str | Target, **kwargs: Any) -> Space:
    """The template for ``op`` ("matmul", "matmul_tensorcore", "conv2d", "elementwise", "reduction") on
    ``target``'s kind."""
    t = targets.get(target)
    if (op, t.kind) not in TEMPLATES:
        raise SpaceError(f"no {t.kind} template for {op!r}; known: {sorted({o for o, _ in TEMPLATES})}")
    return TEMPLATES[op, t.kind](*args, target=t, **kwargs)
