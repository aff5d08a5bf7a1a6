"""The figures that describe one piece of hardware, as a frozen table row.

A Target is data: the cost model, the tile-space constraints and the code
generators read its fields and never restate a limit. Fields that do not apply
to a kind of hardware (``sm_count`` on a CPU, ``isa`` on a GPU) are ``None``, and
so is a figure the hardware does not have (bf16 throughput on a V100).

Units: FLOP/s (and OP/s for int8), bytes, bytes/s, Hz. Tensor-core figures are
dense (without 2:4 sparsity); ``sparse_tensor_cores`` says whether the 2x
sparse rate exists at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# dtype spellings that peak_flops accepts, mapped to the field holding the figure.
_PEAK_FIELD = {
    "float32": "peak_fp32_flops",
    "float": "peak_fp32_flops",
    "fp32": "peak_fp32_flops",
    "float16": "peak_fp16_flops",
    "half": "peak_fp16_flops",
    "fp16": "peak_fp16_flops",
    "bfloat16": "peak_bf16_flops",
    "bf16": "peak_bf16_flops",
    "tfloat32": "peak_tf32_flops",
    "tf32": "peak_tf32_flops",
    "int8": "peak_int8_ops",
    "float8": "peak_fp8_flops",
    "fp8": "peak_fp8_flops",
    "float8_e4m3fn": "peak_fp8_flops",
    "float8_e5m2": "peak_fp8_flops",
}


@dataclass(frozen=True, kw_only=True)
class Target:
    """One hardware description: peak throughput, memory system and launch limits."""

    name: str
    kind: Literal["gpu", "cpu"]
    vendor: str
    description: str
    source: str  # data sheet / whitepaper titles and URLs, or how the figures were detected

    # Throughput and memory (both kinds).
    peak_fp32_flops: float | None = None  # GPU: CUDA cores, not tensor cores
    peak_fp16_flops: float | None = None  # GPU: dense tensor core, fp32 accumulate
    peak_bf16_flops: float | None = None  # GPU: dense tensor core, fp32 accumulate
    peak_tf32_flops: float | None = None  # GPU: dense tensor core
    peak_int8_ops: float | None = None  # GPU: dense tensor core, int32 accumulate
    peak_fp8_flops: float | None = None  # GPU: dense tensor core (e4m3/e5m2), fp32 accumulate; Hopper, Ada
    mem_bandwidth: float | None = None  # bytes/s, DRAM
    l2_bytes: int | None = None  # GPU: whole chip; CPU: per core
    clock_hz: float | None = None  # GPU: boost clock; CPU: max (or reported) clock

    # GPU (CUDA) only.
    sm_count: int | None = None
    compute_capability: tuple[int, int] | None = None
    arch: str | None = None  # "sm_80"
    smem_per_block: int | None = None  # max dynamic shared memory per block, opt-in
    smem_per_sm: int | None = None
    regs_per_sm: int | None = None
    regs_per_thread: int | None = None
    max_threads_per_block: int | None = None
    max_threads_per_sm: int | None = None
    max_blocks_per_sm: int | None = None
    warp_size: int | None = None
    sparse_tensor_cores: bool | None = None  # 2:4 structured sparsity at 2x rate

    # CPU only.
    cores: int | None = None  # physical cores available to this process
    threads: int | None = None  # logical CPUs available to this process
    isa: frozenset[str] | None = None  # "avx2", "avx512f", "avx512_bf16", "fma", "neon", "amx", ...
    vector_bits: int | None = None  # widest SIMD register used for fp32
    fma_units: int | None = None  # vector FMA pipes per core assumed by the peak estimate
    l1d_bytes: int | None = None  # per core
    l3_bytes: int | None = None  # as reported for cpu0's L3 (shared by the cores of a socket)

    @property
    def vector_lanes_fp32(self) -> int | None:
        """fp32 elements per SIMD register (CPU); None for GPUs."""
        return None if self.vector_bits is None else self.vector_bits // 32

    def peak_flops(self, dtype: object) -> float | None:
        """Peak throughput for ``dtype`` ("float32", "float16", "bfloat16", "tfloat32",
        "int8", "float8", short forms such as "bf16", or a ``torch.dtype``).

        On a GPU float32 is the CUDA-core figure and float16/bfloat16 the dense
        tensor-core figure. None when the hardware has no figure for that dtype.
        """
        key = str(dtype).removeprefix("torch.").lower()
        if key not in _PEAK_FIELD:
            raise ValueError(f"no peak figure for dtype {dtype!r}; known: {sorted(_PEAK_FIELD)}")
        return getattr(self, _PEAK_FIELD[key])

    def ridge_point(self, dtype: object = "float32") -> float | None:
        """Arithmetic intensity (FLOP per DRAM byte) where the roofline turns from
        memory-bound to compute-bound; None when a figure is missing."""
        peak = self.peak_flops(dtype)
        if peak is None or not self.mem_bandwidth:
            return None
        return peak / self.mem_bandwidth
