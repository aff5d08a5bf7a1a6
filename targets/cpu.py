"""The host CPU as a Target, detected from the machine without extra dependencies.

Two steps, kept apart so the estimate can be tested without the machine:
``read_host_facts()`` reads what Linux reports (``/proc/cpuinfo`` flags or
Features, ``os.sched_getaffinity``, ``/sys/devices/system/cpu``), and
``target_from_facts()`` turns those facts into figures. Anything that cannot be
read falls back to a stated default and is named in the target's ``source``
("assumed: ..."); detection never raises.

The throughput and bandwidth figures are estimates for a roofline, not
measurements:

- peak fp32 = cores x clock x (vector_bits / 32) x 2 (FMA) x fma_units, with
  fma_units = 2 for x86 cores with FMA (AVX2 / AVX-512 server cores: Skylake-SP
  Gold/Platinum, Ice Lake-SP, Sapphire Rapids have two FMA pipes) and for
  AArch64 NEON (Neoverse N1/N2/V1 have at least two 128-bit FMA pipes), else 1.
  AMD Zen 4 (family 0x19 with AVX-512) splits each 512-bit op into two 256-bit
  halves on its two FMA pipes: fma_units = 1 at 512 bits (its 7x7 stem conv,
  compute-bound, measured 193 GFLOP/s on 2 cores, above the 166 that one FMA per
  cycle at the reported 2.6 GHz base clock gives and far under the 332 of two:
  the VM reports the base clock, and the cores boost). Cores with one 512-bit
  FMA pipe (some Xeon Silver/Bronze) are still overestimated by 2x.
- bf16/fp16/int8: AMX tiles are 1024 bf16/fp16 FLOP and 2048 int8 OP per cycle
  per core (TDPBF16PS: 16x16x32 multiply-adds every 16 cycles); without AMX,
  the dot-product instructions (AVX512_BF16, AVX512_FP16, VNNI, and the Arm
  equivalents) give 2x (16-bit) and 4x (int8) the fp32 rate. None when the ISA
  has neither.
- clock: cpufreq's maximum, else the highest "cpu MHz" in /proc/cpuinfo (a VM
  usually reports its base clock), else 2.5 GHz.
- memory bandwidth: 10 GB/s per core, capped at 200 GB/s (about eight DDR4-3200
  channels). A guess: a single stream rarely gets more than ~10-20 GB/s per core.
- caches fall back to 32 KiB L1d, 256 KiB L2 and no L3.
"""

from __future__ import annotations

import glob
import os
import platform
from dataclasses import dataclass
from functools import lru_cache

from .target import Target

KiB = 1024

DEFAULT_CLOCK_HZ = 2.5e9
DEFAULT_L1D_BYTES = 32 * KiB
DEFAULT_L2_BYTES = 256 * KiB
BANDWIDTH_PER_CORE = 10e9
BANDWIDTH_CAP = 200e9

# cpuinfo flag spellings kept in Target.isa (vector and matrix extensions a code
# generator cares about). x86 "pni" is SSE3; Arm "asimd" is also listed as "neon".
_X86_ISA = {
    "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
}  # fmt: skip
_ARM_ISA = {"fp", "neon", "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "bf16", "i8mm", "sme"}

# x86 vendor_id, or the Arm "CPU implementer" code.
_VENDORS = {
    "GenuineIntel": "Intel", "AuthenticAMD": "AMD", "HygonGenuine": "Hygon",
    "0x41": "Arm", "0x42": "Broadcom", "0x46": "Fujitsu", "0x48": "HiSilicon",
    "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple", "0xc0": "Ampere",
}  # fmt: skip


@dataclass(frozen=True)
class HostFacts:
    """What the machine reports about its CPU; None where it reported nothing."""

    machine: str  # platform.machine(): "x86_64", "aarch64", "arm64", ...
    flags: frozenset[str] = frozenset()  # cpuinfo "flags" (x86) or "Features" (Arm)
    vendor: str | None = None  # vendor_id or CPU implementer, as reported
    model: str | None = None
    threads: int | None = None
    cores: int | None = None
    clock_hz: float | None = None
    l1d_bytes: int | None = None
    l2_bytes: int | None = None
    l3_bytes: int | None = None
    sve_vector_bits: int | None = None
    family: int | None = None  # x86 "cpu family" (AMD 25 = 0x19: Zen 3 and Zen 4; 26 = 0x1A: Zen 5)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _parse_size(text: str) -> int | None:
    """'48K', '2048K', '32M', '1024' -> bytes."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": KiB, "M": KiB**2, "G": KiB**3}.get(text[-1:], 1)
    digits = text[:-1] if scale != 1 else text
    return int(digits) * scale if digits.isdigit() else None


def _cpuinfo_fields(text: str) -> tuple[dict[str, str], float | None]:
    """Fields of the first processor block, and the highest 'cpu MHz' of any."""
    fields: dict[str, str] = {}
    mhz: list[float] = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        fields.setdefault(key, value)
        if key == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
    return fields, (max(mhz) * 1e6 if mhz else None)


def _available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _physical_cores(cpus: list[int]) -> int | None:
    """Distinct (package, core) pairs among the CPUs we may run on; SMT siblings count once."""
    pairs = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        package, core = _read(base + "physical_package_id"), _read(base + "core_id")
        if package is None or core is None:
            return None
        pairs.add((package.strip(), core.strip()))
    return len(pairs) or None


def _caches() -> dict[str, int]:
    sizes: dict[str, int] = {}
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        level, kind, size = (_read(f"{index}/{f}") for f in ("level", "type", "size"))
        if level is None or kind is None or size is None:
            continue
        nbytes = _parse_size(size)
        if nbytes is None:
            continue
        level, kind = level.strip(), kind.strip()
        if level == "1" and kind == "Data":
            sizes["l1d_bytes"] = nbytes
        elif level == "2" and kind in ("Unified", "Data"):
            sizes["l2_bytes"] = nbytes
        elif level == "3":
            sizes["l3_bytes"] = nbytes
    return sizes


def _max_freq_hz() -> float | None:
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    return int(khz) * 1e3 if khz and khz.strip().isdigit() else None


def _sve_bits() -> int | None:
    nbytes = _read("/proc/sys/abi/sve_default_vector_length")
    return int(nbytes) * 8 if nbytes and nbytes.strip().isdigit() else None


def read_host_facts() -> HostFacts:
    """Read what this machine reports about its CPU. Never raises."""
    fields, mhz_clock = _cpuinfo_fields(_read("/proc/cpuinfo") or "")
    flags = fields.get("flags") or fields.get("Features") or ""
    cpus = _available_cpus()
    return HostFacts(
        machine=platform.machine().lower(),
        flags=frozenset(flags.split()),
        vendor=fields.get("vendor_id") or fields.get("CPU implementer"),
        model=fields.get("model name"),
        threads=len(cpus),
        cores=_physical_cores(cpus),
        clock_hz=_max_freq_hz() or mhz_clock,
        sve_vector_bits=_sve_bits() if "sve" in flags.split() else None,
        family=int(fields["cpu family"]) if fields.get("cpu family", "").strip().isdigit() else None,
        **_caches(),
    )


def _isa(facts: HostFacts) -> frozenset[str]:
    is_arm = facts.machine in ("aarch64", "arm64") or facts.machine.startswith("arm")
    isa = set(facts.flags & (_ARM_ISA if is_arm else _X86_ISA))
    if "pni" in facts.flags:
        isa.add("sse3")
    if not facts.flags:  # no cpuinfo: only what the architecture guarantees
        if facts.machine in ("aarch64", "arm64"):
            isa.add("asimd")
        elif facts.machine in ("x86_64", "amd64"):
            isa.update(("sse", "sse2"))
    if "asimd" in isa:
        isa.add("neon")
    if "amx_tile" in isa:
        isa.add("amx")
    return frozenset(isa)


def _vector_bits(isa: frozenset[str], sve_bits: int | None) -> int:
    if "avx512f" in isa:
        return 512
    if "avx" in isa:
        return 256
    if "sve" in isa and sve_bits:
        return max(sve_bits, 128)
    if isa & {"sse", "neon"}:
        return 128
    return 32  # unknown ISA: count scalar fp32 only


def _fma_units(isa: frozenset[str], vendor: str | None = None, family: int | None = None) -> int:
    """FMAs of the full vector width per cycle."""
    if vendor == "AuthenticAMD" and family == 0x19 and "avx512f" in isa:
        return 1  # Zen 4: two 256-bit FMA pipes, a 512-bit FMA takes both (Zen 3, the same family, has no AVX-512)
    if "fma" in isa and isa & {"avx2", "avx512f"}:
        return 2
    if "neon" in isa:
        return 2
    return 1


def target_from_facts(facts: HostFacts) -> Target:
    """Estimate the host's figures from ``facts`` (the formulas are in the module docstring)."""
    assumed = []
    threads = facts.threads or 1
    cores = facts.cores or threads
    if facts.cores is None:
        assumed.append("cores")
    clock = facts.clock_hz
    if not clock:
        clock = DEFAULT_CLOCK_HZ
        assumed.append("clock_hz")
    caches = {}
    for field, default in (
        ("l1d_bytes", DEFAULT_L1D_BYTES),
        ("l2_bytes", DEFAULT_L2_BYTES),
        ("l3_bytes", None),
    ):
        caches[field] = getattr(facts, field) or default
        if not getattr(facts, field):
            assumed.append(field)

    isa = _isa(facts)
    vector_bits = _vector_bits(isa, facts.sve_vector_bits)
    fma_units = _fma_units(isa, facts.vendor, facts.family)
    per_core_cycle = clock * cores  # core-cycles per second
    fp32 = per_core_cycle * (vector_bits // 32) * 2 * fma_units

    if "amx_bf16" in isa:
        bf16 = per_core_cycle * 1024
    elif isa & {"avx512_bf16", "bf16"}:
        bf16 = 2 * fp32
    else:
        bf16 = None
    if "amx_fp16" in isa:
        fp16 = per_core_cycle * 1024
    elif isa & {"avx512_fp16", "asimdhp"}:
        fp16 = 2 * fp32
    else:
        fp16 = None
    if "amx_int8" in isa:
        int8 = per_core_cycle * 2048
    elif isa & {"avx512_vnni", "avx_vnni", "asimddp"}:
        int8 = 4 * fp32
    else:
        int8 = None

    vendor = _VENDORS.get(facts.vendor or "", facts.vendor or "unknown")
    model = facts.model or facts.machine or "unknown CPU"
    source = (
        "detected on this machine from /proc/cpuinfo, /sys/devices/system/cpu and the process's "
        "CPU affinity; peak throughput and memory bandwidth are estimates (optic.targets.cpu)"
    )
    if assumed:
        source += f"; assumed (not detected): {', '.join(assumed)}"
    return Target(
        name="cpu",
        kind="cpu",
        vendor=vendor,
        description=f"{model} ({facts.machine}), {cores} cores / {threads} threads available",
        source=source,
        peak_fp32_flops=fp32,
        peak_fp16_flops=fp16,
        peak_bf16_flops=bf16,
        peak_int8_ops=int8,
        mem_bandwidth=min(cores * BANDWIDTH_PER_CORE, BANDWIDTH_CAP),
        clock_hz=clock,
        cores=cores,
        threads=threads,
        isa=isa,
        vector_bits=vector_bits,
        fma_units=fma_units,
        **caches,
    )


@lru_cache(maxsize=1)
def host() -> Target:
    """The CPU this process runs on, detected once per process."""
    return target_from_facts(read_host_facts())


@lru_cache(maxsize=1)
def host_fingerprint() -> str:
    """What code compiled here depends on: architecture, CPU model, vector/matrix extensions and the torch
    build. Two machines with the same fingerprint run each other's compiled kernels; saved results compare
    it on load (optic.saving) and compile again where it differs."""
    import torch

    facts = read_host_facts()
    return f"{facts.machine}|{facts.model or '?'}|{','.join(sorted(_isa(facts)))}|torch {torch.__version__}"
