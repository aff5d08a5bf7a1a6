"""Target tables: names resolve, figures agree with each other, the host is detected."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from optic.errors import UnknownTargetError
from optic.targets import Target, get, host, names
from optic.targets.cpu import HostFacts, read_host_facts, target_from_facts

GPU_NAMES = ["a100", "h100", "h200", "v100", "t4", "l4", "rtx4090"]

# FP32 CUDA cores per SM, from each architecture's whitepaper; used only to
# cross-check the data sheet's fp32 figure against sm_count and clock_hz.
FP32_LANES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 9): 128, (9, 0): 128}

# CUDA C++ Programming Guide, Technical Specifications per Compute Capability.
CC_LIMITS = {
    (7, 0): (98304, 98304, 2048),
    (7, 5): (65536, 65536, 1024),
    (8, 0): (166912, 167936, 2048),
    (8, 9): (101376, 102400, 1536),
    (9, 0): (232448, 233472, 2048),
}


# --- names -------------------------------------------------------------------


def test_names_cover_the_required_targets():
    assert set(GPU_NAMES + ["cpu"]) <= set(names())
    assert names() == sorted(names())


@pytest.mark.parametrize("name", names())
def test_every_name_resolves_to_its_table(name):
    target = get(name)
    assert isinstance(target, Target)
    assert target.name == name
    assert target.source


@pytest.mark.parametrize(
    ("spelling", "name"),
    [
        ("A100", "a100"),
        ("H100", "h100"),
        ("Rtx4090", "rtx4090"),
        ("CPU", "cpu"),
        ("rtx-4090", "rtx4090"),
        ("h100-sxm", "h100"),
        ("host", "cpu"),
        # torch.cuda.get_device_name() on these boards
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("Tesla V100-SXM2-32GB", "v100"),
        ("Tesla T4", "t4"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ],
)
def test_spellings_and_aliases(spelling, name):
    assert get(spelling) is get(name)


def test_a_target_is_returned_as_is():
    for name in names():
        target = get(name)
        assert get(target) is target
    custom = dataclasses.replace(get("a100"), name="my-a100", sm_count=98)
    assert get(custom) is custom


def test_host_is_cached_and_is_cpu():
    assert host() is host() is get("cpu")


@pytest.mark.parametrize(
    ("typo", "closest"), [("h1000", "h100"), ("a10", "a100"), ("rtx4080", "rtx4090"), ("t40", "t4")]
)
def test_unknown_name_lists_known_names_and_closest(typo, closest):
    with pytest.raises(UnknownTargetError) as info:
        get(typo)
    message = str(info.value)
    assert f"'{typo}'" in message
    for name in names():
        assert name in message
    assert f"Did you mean '{closest}'?" in message
    assert info.value.closest == closest


def test_unknown_name_without_a_close_match_still_lists_names():
    with pytest.raises(UnknownTargetError) as info:
        get("tpu-v5e-pod")
    assert "Did you mean" not in str(info.value)
    assert all(name in str(info.value) for name in names())


def test_variants_with_other_figures_are_not_aliased():
    # The 40 GB A100 and the PCIe H100 have other bandwidths and clocks.
    for other in ("a100-40gb", "NVIDIA H100 PCIe"):
        with pytest.raises(UnknownTargetError):
            get(other)


def test_targets_are_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get("a100").sm_count = 1  # type: ignore[misc]
    assert len({get(name) for name in names()}) == len(names())


# --- GPU tables --------------------------------------------------------------


@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_figures_are_positive_and_complete(name):
    t = get(name)
    assert (t.kind, t.vendor) == ("gpu", "NVIDIA")
    for field in (
        "peak_fp32_flops", "peak_fp16_flops", "mem_bandwidth", "l2_bytes", "clock_hz", "sm_count",
        "smem_per_block", "smem_per_sm", "regs_per_sm", "max_threads_per_sm", "max_blocks_per_sm",
    ):  # fmt: skip
        assert getattr(t, field) > 0, field
    assert (t.regs_per_thread, t.max_threads_per_block, t.warp_size) == (255, 1024, 32)
    assert t.regs_per_sm == 65536
    assert t.cores is None and t.isa is None and t.vector_bits is None
    assert t.vector_lanes_fp32 is None


@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_tensor_rates_exceed_cuda_core_fp32(name):
    t = get(name)
    assert t.peak_fp16_flops > t.peak_fp32_flops
    if t.peak_bf16_flops is not None:
        assert t.peak_bf16_flops == t.peak_fp16_flops
    if t.peak_tf32_flops is not None:
        assert t.peak_fp32_flops <= t.peak_tf32_flops < t.peak_fp16_flops
    if t.peak_int8_ops is not None:
        assert t.peak_int8_ops >= 2 * t.peak_fp16_flops


@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_fp32_figure_matches_sms_times_clock(name):
    t = get(name)
    derived = t.sm_count * FP32_LANES_PER_SM[t.compute_capability] * 2 * t.clock_hz
    assert derived == pytest.approx(t.peak_fp32_flops, rel=0.02)


@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_limits_follow_compute_capability(name):
    t = get(name)
    major, minor = t.compute_capability
    assert t.arch == f"sm_{major}{minor}"
    assert (t.smem_per_block, t.smem_per_sm, t.max_threads_per_sm) == CC_LIMITS[t.compute_capability]
    assert t.smem_per_block <= t.smem_per_sm
    assert t.max_threads_per_block <= t.max_threads_per_sm
    assert t.max_threads_per_sm % t.warp_size == 0
    # a full block of threads at the register cap must not need more than the SM has
    assert t.regs_per_thread * t.max_threads_per_block <= 4 * t.regs_per_sm


def test_gpu_compute_capabilities():
    expected = {
        "v100": (7, 0),
        "t4": (7, 5),
        "a100": (8, 0),
        "l4": (8, 9),
        "rtx4090": (8, 9),
        "h100": (9, 0),
        "h200": (9, 0),
    }
    assert {name: get(name).compute_capability for name in expected} == expected


def test_sparse_tensor_cores():
    sparse = {name for name in GPU_NAMES if get(name).sparse_tensor_cores}
    assert sparse == {"a100", "h100", "h200", "l4", "rtx4090"}
    assert get("v100").sparse_tensor_cores is False
    assert get("t4").sparse_tensor_cores is False


def test_h200_is_h100_with_more_memory_bandwidth():
    h100, h200 = get("h100"), get("h200")
    assert h200.mem_bandwidth > h100.mem_bandwidth
    same = (
        "sm_count",
        "peak_fp32_flops",
        "peak_fp16_flops",
        "l2_bytes",
        "smem_per_block",
        "compute_capability",
    )
    assert all(getattr(h100, f) == getattr(h200, f) for f in same)


def test_figures_without_hardware_support_are_none():
    for name in ("v100", "t4"):
        t = get(name)
        assert t.peak_bf16_flops is None and t.peak_tf32_flops is None
        assert t.peak_flops("bfloat16") is None
        assert t.ridge_point("bfloat16") is None


# --- peak_flops and ridge_point ------------------------------------------------


def test_peak_flops_picks_the_field_for_each_dtype():
    t = get("a100")
    assert t.peak_flops("float32") == t.peak_fp32_flops == 19.5e12
    assert t.peak_flops("float16") == t.peak_fp16_flops == 312e12
    assert t.peak_flops("bfloat16") == t.peak_bf16_flops
    assert t.peak_flops("tf32") == t.peak_tf32_flops
    assert t.peak_flops("int8") == t.peak_int8_ops
    assert t.peak_flops("BF16") == t.peak_flops("bfloat16")


def test_peak_flops_accepts_torch_dtypes():
    torch = pytest.importorskip("torch")
    t = get("h100")
    assert t.peak_flops(torch.float32) == t.peak_fp32_flops
    assert t.peak_flops(torch.bfloat16) == t.peak_bf16_flops
    assert t.peak_flops(torch.float16) == t.peak_fp16_flops


def test_peak_flops_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="float64"):
        get("a100").peak_flops("float64")


@pytest.mark.parametrize("name", names())
def test_ridge_point_is_peak_over_bandwidth(name):
    t = get(name)
    assert t.ridge_point("float32") == pytest.approx(t.peak_fp32_flops / t.mem_bandwidth)
    assert t.ridge_point() == t.ridge_point("float32")


def test_ridge_point_of_a100():
    # 312 TFLOP/s over 2039 GB/s: a bf16 kernel needs ~153 FLOP per byte to be compute-bound.
    assert get("a100").ridge_point("bfloat16") == pytest.approx(153.0, rel=1e-3)


# --- host CPU -----------------------------------------------------------------


def test_host_target_describes_this_machine():
    t = host()
    assert (t.kind, t.name) == ("cpu", "cpu")
    assert t.cores >= 1
    assert t.threads >= t.cores
    assert t.vector_bits in (32, 128, 256, 512) or t.vector_bits % 128 == 0
    assert t.vector_lanes_fp32 == t.vector_bits // 32 >= 1
    assert t.fma_units in (1, 2)
    assert t.clock_hz > 0 and t.peak_fp32_flops > 0 and t.mem_bandwidth > 0
    assert t.l1d_bytes > 0 and t.l2_bytes > 0
    assert t.sm_count is None and t.compute_capability is None and t.smem_per_block is None
    assert t.peak_fp32_flops == pytest.approx(t.cores * t.clock_hz * t.vector_lanes_fp32 * 2 * t.fma_units)


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and os.path.isdir("/sys/devices/system/cpu/cpu0/cache")),
    reason="cache sizes are read from Linux sysfs",
)
def test_host_caches_are_detected_on_linux():
    t = host()
    assert t.l1d_bytes > 0 and t.l2_bytes > 0 and t.l3_bytes and t.l3_bytes > 0
    assert "l1d_bytes" not in t.source and "l2_bytes" not in t.source
    assert t.l1d_bytes <= t.l2_bytes


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
def test_host_isa_is_read_from_cpuinfo():
    t = host()
    assert t.isa
    if "avx512f" in t.isa:
        assert t.vector_bits == 512
    elif "avx2" in t.isa:
        assert t.vector_bits == 256
    if "asimd" in t.isa:
        assert "neon" in t.isa


def test_read_host_facts_never_raises():
    facts = read_host_facts()
    assert facts.threads >= 1


@pytest.mark.parametrize("vendor, family, flags, units", [
    ("AuthenticAMD", 25, "fma avx avx2 avx512f avx512_bf16", 1),  # Zen 4: 512-bit FMAs take both 256-bit pipes
    ("AuthenticAMD", 25, "fma avx avx2", 2),  # Zen 3: the same family, no AVX-512, two 256-bit FMAs
    ("AuthenticAMD", 26, "fma avx avx2 avx512f", 2),  # Zen 5: full-width pipes
    ("GenuineIntel", 6, "fma avx avx2 avx512f", 2),
])
def test_fma_units_per_cycle_at_the_full_vector_width(vendor, family, flags, units):
    facts = HostFacts(machine="x86_64", flags=frozenset(flags.split()), vendor=vendor, family=family,
                      threads=2, cores=2, clock_hz=2.6e9)
    t = target_from_facts(facts)
    assert t.fma_units == units
    assert t.peak_fp32_flops == pytest.approx(2 * 2.6e9 * t.vector_lanes_fp32 * 2 * units)


def test_x86_server_core_estimate():
    facts = HostFacts(
        machine="x86_64",
        flags=frozenset("fpu sse sse2 pni fma avx avx2 avx512f avx512_bf16 avx512_vnni".split()),
        vendor="GenuineIntel",
        threads=8, cores=4, clock_hz=3e9,
        l1d_bytes=48 * 1024, l2_bytes=2 << 20, l3_bytes=32 << 20,
    )  # fmt: skip
    t = target_from_facts(facts)
    assert t.vendor == "Intel"
    assert {"sse3", "avx2", "avx512f", "avx512_bf16", "fma"} <= t.isa
    assert "fpu" not in t.isa
    assert (t.vector_bits, t.vector_lanes_fp32, t.fma_units) == (512, 16, 2)
    assert t.peak_fp32_flops == 4 * 3e9 * 16 * 2 * 2
    assert t.peak_bf16_flops == 2 * t.peak_fp32_flops
    assert t.peak_int8_ops == 4 * t.peak_fp32_flops
    assert t.peak_fp16_flops is None
    assert "assumed" not in t.source


def test_amx_core_estimate():
    flags = "sse sse2 fma avx avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8"
    t = target_from_facts(HostFacts(machine="x86_64", flags=frozenset(flags.split()), cores=2, clock_hz=2e9))
    assert "amx" in t.isa
    assert t.peak_bf16_flops == 2 * 2e9 * 1024
    assert t.peak_int8_ops == 2 * 2e9 * 2048


def test_avx2_client_core_estimate():
    t = target_from_facts(
        HostFacts(machine="x86_64", flags=frozenset("sse sse2 fma avx avx2".split()), cores=1, clock_hz=1e9)
    )
    assert (t.vector_bits, t.vector_lanes_fp32, t.fma_units) == (256, 8, 2)
    assert t.peak_fp32_flops == 1e9 * 8 * 2 * 2


def test_arm_features_are_read():
    facts = HostFacts(
        machine="aarch64",
        flags=frozenset("fp asimd evtstrm aes asimdhp asimddp sve bf16 i8mm".split()),
        vendor="0x41",
        threads=4, cores=4, clock_hz=2.6e9,
        sve_vector_bits=256,
    )  # fmt: skip
    t = target_from_facts(facts)
    assert t.vendor == "Arm"
    assert {"neon", "asimd", "sve", "bf16"} <= t.isa
    assert "aes" not in t.isa
    assert (t.vector_bits, t.fma_units) == (256, 2)
    assert t.peak_fp16_flops == 2 * t.peak_fp32_flops


def test_unknown_platform_falls_back_without_raising():
    t = target_from_facts(HostFacts(machine="riscv64"))
    assert (t.cores, t.threads) == (1, 1)
    assert (t.vector_bits, t.vector_lanes_fp32, t.fma_units) == (32, 1, 1)
    assert t.clock_hz == 2.5e9
    assert t.l1d_bytes > 0 and t.l2_bytes > 0 and t.l3_bytes is None
    assert t.peak_fp32_flops == 2.5e9 * 2
    assert t.vendor == "unknown"
    for field in ("cores", "clock_hz", "l1d_bytes", "l2_bytes", "l3_bytes"):
        assert field in t.source


def test_bare_arm_without_cpuinfo_assumes_neon():
    t = target_from_facts(HostFacts(machine="arm64"))
    assert "neon" in t.isa and t.vector_bits == 128


# --- target="cuda": the GPU this process sees ----------------------------------


def _props(name, cc, sms, gib=80, **more):
    return dataclasses.make_dataclass("Props", ["name", "major", "minor", "multi_processor_count", "total_memory",
                                                *more])(name, cc[0], cc[1], sms, gib * 2**30, *more.values())


def test_a_detected_board_with_a_table_keeps_its_data_sheet_rates():
    from optic.targets import cuda, table_for

    t = cuda.from_properties(_props("NVIDIA H100 80GB HBM3", (9, 0), 132), table_for)
    h100 = get("h100")
    assert (t.name, t.arch, t.sm_count) == ("cuda", "sm_90", 132)
    assert t.peak_bf16_flops == h100.peak_bf16_flops and t.smem_per_block == h100.smem_per_block
    assert "H100" in t.description and "h100" in t.description


def test_a_partitioned_board_scales_its_rates_by_its_sms():
    from optic.targets import cuda, table_for

    t = cuda.from_properties(_props("NVIDIA A100-SXM4-80GB", (8, 0), 54, gib=40), table_for)
    assert t.sm_count == 54 and t.peak_bf16_flops == pytest.approx(get("a100").peak_bf16_flops / 2)
    assert t.mem_bandwidth == get("a100").mem_bandwidth and "54/108" in t.description


def test_a_board_without_a_table_gets_its_limits_and_no_invented_tensor_rates():
    from optic.targets import cuda, table_for

    t = cuda.from_properties(_props("NVIDIA RTX A6000", (8, 6), 84, gib=48, clock_rate=1_800_000,
                                    L2_cache_size=6 * 2**20), table_for)
    assert (t.arch, t.compute_capability) == ("sm_86", (8, 6))
    assert t.smem_per_block == 99 * 1024 and t.max_threads_per_sm == 1536  # 8.6's limits, not 8.0's
    assert t.peak_fp32_flops == pytest.approx(84 * 128 * 2 * 1.8e9) and t.peak_bf16_flops is None
    assert t.l2_bytes == 6 * 2**20 and "tensor-core rates unknown" in t.description


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_an_error_naming_the_gpu_tables():
    from optic.errors import OpticError

    for name in ("cuda", "CUDA:0", "gpu"):
        with pytest.raises(OpticError, match="this machine's GPU.*a100, h100, h200, l4, rtx4090, t4, v100"):
            get(name)


def test_fp8_rates_exist_only_where_the_tensor_cores_have_fp8():
    for name in ("h100", "h200", "l4", "rtx4090"):
        t = get(name)
        assert t.peak_flops("fp8") == t.peak_flops("float8_e4m3fn") == t.peak_fp8_flops
        assert t.peak_bf16_flops < t.peak_fp8_flops <= t.peak_int8_ops
    for name in ("a100", "v100", "t4"):  # Ampere, Volta, Turing: no fp8 tensor cores
        assert get(name).peak_flops("float8") is None
