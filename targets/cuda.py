"""``target="cuda"``: the GPU this process sees, detected like the host CPU is.

The board is recognised by the name CUDA reports (``torch.cuda.get_device_properties``), through the
same aliases as ``targets.get``: a board with a table keeps the table's data-sheet rates, with the
detected SM count (a board may be cut down or partitioned, MIG) and memory size noted in the
description. A board without a table gets the compute capability's launch limits and an fp32 rate
from its SMs and clock where CUDA reports the clock; its tensor-core rates stay unknown (None), so the
cost model plans it as a CUDA-core machine and says so rather than invent figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from .gpus import _CC_LIMITS, _gpu
from .target import Target

# FP32 lanes per SM by compute capability (each architecture's whitepaper): for the fp32 rate of a
# board without a table, SMs x lanes x 2 (FMA) x clock.
_FP32_LANES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 9): 128, (9, 0): 128,
                      (10, 0): 128, (12, 0): 128}


class DeviceProperties(Protocol):
    """What ``torch.cuda.get_device_properties`` reports, as far as a target needs it."""

    name: str
    major: int
    minor: int
    multi_processor_count: int
    total_memory: int


class NoGPUError(LookupError):
    """``target="cuda"`` on a machine where PyTorch sees no GPU."""


def properties(index: int = 0) -> DeviceProperties:
    """The properties of GPU ``index`` as PyTorch reports them; ``NoGPUError`` when it sees none."""
    import torch

    if not torch.cuda.is_available():
        raise NoGPUError("PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    if index >= torch.cuda.device_count():
        raise NoGPUError(f"PyTorch sees {torch.cuda.device_count()} CUDA GPU(s) here; there is no cuda:{index}")
    return torch.cuda.get_device_properties(index)


def from_properties(props: DeviceProperties, table_for: Any) -> Target:
    """The Target of a GPU with these properties. ``table_for(name)``: the table row of a board name, or None."""
    cc = (int(props.major), int(props.minor))
    sms = int(props.multi_processor_count)
    memory = f"{props.total_memory / 2**30:.0f} GiB"
    table = table_for(props.name)
    if table is not None and table.compute_capability == cc:
        note = f"detected {props.name} ({sms} SMs, {memory}); data-sheet rates of '{table.name}'"
        if sms != table.sm_count:  # a partition (MIG) or a cut-down board: rates scale with the SMs
            scale = sms / table.sm_count
            rates = {f: getattr(table, f) * scale for f in ("peak_fp32_flops", "peak_fp16_flops", "peak_bf16_flops",
                                                             "peak_tf32_flops", "peak_int8_ops", "peak_fp8_flops")
                     if getattr(table, f) is not None}
            note += f", scaled by {sms}/{table.sm_count} SMs"
        else:
            rates = {}
        return dataclasses.replace(table, **rates, name="cuda", sm_count=sms, description=note,
                                   source=f"detected: torch.cuda.get_device_properties; {table.source}")
    limits_cc = cc if cc in _CC_LIMITS else max((c for c in _CC_LIMITS if c <= cc), default=min(_CC_LIMITS))
    clock = getattr(props, "clock_rate", None)  # kHz, where the torch build reports it
    lanes = _FP32_LANES_PER_SM.get(cc)
    fp32 = sms * lanes * 2 * clock * 1e3 if clock and lanes else None
    l2 = getattr(props, "L2_cache_size", None)
    t = _gpu(name="cuda", compute_capability=limits_cc, description=(
        f"detected {props.name} (compute capability {cc[0]}.{cc[1]}, {sms} SMs, {memory}); no data-sheet table: "
        "tensor-core rates unknown"), source="detected: torch.cuda.get_device_properties", sm_count=sms,
        peak_fp32_flops=fp32, l2_bytes=int(l2) if l2 else None, clock_hz=clock * 1e3 if clock else None)
    return dataclasses.replace(t, compute_capability=cc, arch=f"sm_{cc[0]}{cc[1]}")


def detect(index: int, table_for: Any) -> Target:
    """The Target of this process's GPU ``index`` (``NoGPUError`` without one)."""
    return from_properties(properties(index), table_for)


def same_board(target: Target, props: DeviceProperties, table_for: Any) -> bool:
    """Whether ``target`` (a table row) describes the board with these properties."""
    table = table_for(props.name)
    return table is not None and table.name == target.name


__all__ = ["DeviceProperties", "NoGPUError", "detect", "from_properties", "properties", "same_board"]
