"""NVIDIA GPU tables, one row per board, each with the documents its figures come from.

Throughput figures are the data sheet's. Data sheets quote tensor-core rates
"with sparsity"; the rows hold the dense rate (half of that), which is what a
dense kernel can reach. fp16 and bf16 rates are with fp32 accumulation (what
PyTorch's GEMMs use); where fp16 accumulation is faster (GeForce) the comment
says so. Memory sizes quoted as "MB" by NVIDIA are binary (40 MB L2 on A100 is
reported by cudaDeviceProp.l2CacheSize as 41943040 bytes).

Limits that depend only on the compute capability (shared memory, threads,
registers, resident blocks) live once in ``_CC_LIMITS``, from the CUDA C++
Programming Guide, "Technical Specifications per Compute Capability":
https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html#features-and-technical-specifications-technical-specifications-per-compute-capability
"""

from __future__ import annotations

from .target import Target

KiB = 1024
MiB = 1024 * KiB
T = 1e12
G = 1e9

# Per compute capability: max shared memory per block (opt-in, via
# cudaFuncAttributeMaxDynamicSharedMemorySize), shared memory per SM, resident
# threads per SM, resident blocks per SM.
_CC_LIMITS: dict[tuple[int, int], tuple[int, int, int, int]] = {
    (7, 0): ( 96 * KiB,  96 * KiB, 2048, 32),
    (7, 5): ( 64 * KiB,  64 * KiB, 1024, 16),
    (8, 0): (163 * KiB, 164 * KiB, 2048, 32),
    (8, 6): ( 99 * KiB, 100 * KiB, 1536, 16),
    (8, 9): ( 99 * KiB, 100 * KiB, 1536, 24),
    (9, 0): (227 * KiB, 228 * KiB, 2048, 32),
}  # fmt: skip

# The same for every compute capability listed above (same table).
_COMMON_LIMITS = dict(
    regs_per_sm=64 * KiB,  # 32-bit registers
    regs_per_thread=255,
    max_threads_per_block=1024,
    warp_size=32,
)

_CC_SOURCE = (
    "CUDA C++ Programming Guide, Technical Specifications per Compute Capability, "
    "https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html"
    "#features-and-technical-specifications-technical-specifications-per-compute-capability"
)


def _gpu(*, compute_capability: tuple[int, int], source: str, **figures: object) -> Target:
    major, minor = compute_capability
    smem_per_block, smem_per_sm, max_threads_per_sm, max_blocks_per_sm = _CC_LIMITS[compute_capability]
    return Target(
        kind="gpu",
        vendor="NVIDIA",
        compute_capability=compute_capability,
        arch=f"sm_{major}{minor}",
        source=f"{source}; per-SM limits: {_CC_SOURCE}",
        **_COMMON_LIMITS,
        smem_per_block=smem_per_block,
        smem_per_sm=smem_per_sm,
        max_threads_per_sm=max_threads_per_sm,
        max_blocks_per_sm=max_blocks_per_sm,
        **figures,
    )


# NVIDIA A100 Tensor Core GPU Datasheet, "A100 80GB SXM" column:
#   https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
# NVIDIA A100 Tensor Core GPU Architecture whitepaper (108 SMs, 1410 MHz, 40 MB L2):
#   https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf
A100 = _gpu(
    name="a100",
    description="NVIDIA A100 SXM4 80GB (Ampere GA100)",
    source=(
        "NVIDIA A100 Tensor Core GPU Datasheet (A100 80GB SXM), "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf; "
        "NVIDIA A100 Tensor Core GPU Architecture whitepaper, "
        "https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/nvidia-ampere-architecture-whitepaper.pdf"
    ),
    compute_capability=(8, 0),
    peak_fp32_flops=19.5 * T,
    peak_tf32_flops=156 * T,
    peak_fp16_flops=312 * T,
    peak_bf16_flops=312 * T,
    peak_int8_ops=624 * T,
    mem_bandwidth=2039 * G,  # HBM2e; the 40GB board has 1555 GB/s
    l2_bytes=40 * MiB,
    sm_count=108,
    clock_hz=1410e6,
    sparse_tensor_cores=True,
)

# NVIDIA H100 Tensor Core GPU Datasheet, "H100 SXM" column (sparse figures halved):
#   https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet
# NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5: 132 SMs, 50 MB L2):
#   https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper
H100 = _gpu(
    name="h100",
    description="NVIDIA H100 SXM5 80GB (Hopper GH100)",
    source=(
        "NVIDIA H100 Tensor Core GPU Datasheet (H100 SXM), "
        "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet; "
        "NVIDIA H100 Tensor Core GPU Architecture whitepaper, "
        "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper"
    ),
    compute_capability=(9, 0),
    peak_fp32_flops=67 * T,
    peak_tf32_flops=494.5 * T,  # 989 with sparsity
    peak_fp16_flops=989.5 * T,  # 1979 with sparsity
    peak_bf16_flops=989.5 * T,
    peak_int8_ops=1979 * T,  # 3958 with sparsity
    peak_fp8_flops=1979 * T,  # "FP8 Tensor Core 3,958 teraFLOPS" with sparsity
    mem_bandwidth=3.35 * T,  # HBM3
    l2_bytes=50 * MiB,
    sm_count=132,
    clock_hz=1980e6,  # max boost; 132 SMs x 128 FP32 lanes x 2 x 1.98 GHz = 67 TFLOP/s
    sparse_tensor_cores=True,
)

# NVIDIA H200 Tensor Core GPU Datasheet, "H200 SXM" column (sparse figures halved):
#   https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446
# Same GH100 configuration as H100 SXM5 (132 SMs, 50 MB L2, 1980 MHz); only memory differs.
H200 = _gpu(
    name="h200",
    description="NVIDIA H200 SXM 141GB (Hopper GH100, HBM3e)",
    source=(
        "NVIDIA H200 Tensor Core GPU Datasheet (H200 SXM), "
        "https://nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446; "
        "SMs, L2 and clock as H100 SXM5: NVIDIA H100 Tensor Core GPU Architecture whitepaper, "
        "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper"
    ),
    compute_capability=(9, 0),
    peak_fp32_flops=67 * T,
    peak_tf32_flops=494.5 * T,
    peak_fp16_flops=989.5 * T,
    peak_bf16_flops=989.5 * T,
    peak_int8_ops=1979 * T,
    peak_fp8_flops=1979 * T,
    mem_bandwidth=4.8 * T,  # HBM3e
    l2_bytes=50 * MiB,
    sm_count=132,
    clock_hz=1980e6,
    sparse_tensor_cores=True,
)

# NVIDIA Tesla V100 GPU Datasheet, "V100 SXM2" column:
#   https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf
# NVIDIA Tesla V100 GPU Architecture whitepaper (80 SMs, 1530 MHz, 6144 KB L2):
#   https://images.nvidia.com/content/volta-architecture/pdf/volta-architecture-whitepaper.pdf
# No bf16, tf32 or int8 tensor cores (int8 only via dp4a on CUDA cores, not listed).
V100 = _gpu(
    name="v100",
    description="NVIDIA Tesla V100 SXM2 32GB (Volta GV100)",
    source=(
        "NVIDIA Tesla V100 GPU Datasheet (V100 SXM2), "
        "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf; "
        "NVIDIA Tesla V100 GPU Architecture whitepaper, "
        "https://images.nvidia.com/content/volta-architecture/pdf/volta-architecture-whitepaper.pdf"
    ),
    compute_capability=(7, 0),
    peak_fp32_flops=15.7 * T,
    peak_fp16_flops=125 * T,  # "Tensor Performance", mixed precision
    mem_bandwidth=900 * G,  # HBM2
    l2_bytes=6 * MiB,
    sm_count=80,
    clock_hz=1530e6,
    sparse_tensor_cores=False,
)

# NVIDIA T4 Tensor Core GPU Datasheet:
#   https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf
# NVIDIA Turing GPU Architecture whitepaper, Tesla T4 table (40 SMs, 1590 MHz, 4096 KB L2):
#   https://images.nvidia.com/aem-dam/en-zz/Solutions/design-visualization/technologies/turing-architecture/NVIDIA-Turing-Architecture-Whitepaper.pdf
T4 = _gpu(
    name="t4",
    description="NVIDIA T4 16GB (Turing TU104)",
    source=(
        "NVIDIA T4 Tensor Core GPU Datasheet, "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf; "
        "NVIDIA Turing GPU Architecture whitepaper, "
        "https://images.nvidia.com/aem-dam/en-zz/Solutions/design-visualization/technologies/turing-architecture/"
        "NVIDIA-Turing-Architecture-Whitepaper.pdf"
    ),
    compute_capability=(7, 5),
    peak_fp32_flops=8.1 * T,
    peak_fp16_flops=65 * T,  # "Mixed Precision (FP16/FP32)"
    peak_int8_ops=130 * T,
    mem_bandwidth=320 * G,  # GDDR6
    l2_bytes=4 * MiB,
    sm_count=40,
    clock_hz=1590e6,
    sparse_tensor_cores=False,
)

# NVIDIA L4 Tensor Core GPU Datasheet (sparse figures halved):
#   https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet
# 58 SMs (7424 CUDA cores / 128), 2040 MHz boost and 48 MB L2 are the board's published
# configuration; 58 x 128 x 2 x 2.04 GHz = 30.3 TFLOP/s agrees with the data sheet.
L4 = _gpu(
    name="l4",
    description="NVIDIA L4 24GB (Ada Lovelace AD104)",
    source=(
        "NVIDIA L4 Tensor Core GPU Datasheet, "
        "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet"
    ),
    compute_capability=(8, 9),
    peak_fp32_flops=30.3 * T,
    peak_tf32_flops=60 * T,  # 120 with sparsity
    peak_fp16_flops=121 * T,  # 242 with sparsity
    peak_bf16_flops=121 * T,
    peak_int8_ops=242.5 * T,  # 485 with sparsity
    peak_fp8_flops=242.5 * T,  # "FP8 485 teraFLOPS" with sparsity
    mem_bandwidth=300 * G,  # GDDR6
    l2_bytes=48 * MiB,
    sm_count=58,
    clock_hz=2040e6,
    sparse_tensor_cores=True,
)

# NVIDIA Ada GPU Architecture whitepaper, Appendix A, GeForce RTX 4090 table:
#   https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf
RTX4090 = _gpu(
    name="rtx4090",
    description="NVIDIA GeForce RTX 4090 24GB (Ada Lovelace AD102)",
    source=(
        "NVIDIA Ada GPU Architecture whitepaper, Appendix A (GeForce RTX 4090), "
        "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
    ),
    compute_capability=(8, 9),
    peak_fp32_flops=82.6 * T,
    peak_tf32_flops=82.6 * T,
    peak_fp16_flops=165.2 * T,  # fp32 accumulate; 330.3 with fp16 accumulate (GeForce halves fp32-accumulate)
    peak_bf16_flops=165.2 * T,
    peak_int8_ops=660.6 * T,
    peak_fp8_flops=330.3 * T,  # fp32 accumulate; 660.6 with fp16 accumulate (GeForce halves fp32-accumulate)
    mem_bandwidth=1008 * G,  # GDDR6X
    l2_bytes=72 * MiB,
    sm_count=128,
    clock_hz=2520e6,
    sparse_tensor_cores=True,
)

GPUS: tuple[Target, ...] = (A100, H100, H200, V100, T4, L4, RTX4090)
