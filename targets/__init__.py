"""Hardware descriptions by name: the GPU tables and the detected host CPU.

>>> get("a100").smem_per_block
166912
>>> get("NVIDIA GeForce RTX 4090") is get("rtx4090")
True
"""

from __future__ import annotations

from optic.errors import UnknownTargetError

from .cpu import host
from .gpus import GPUS
from .target import Target

__all__ = ["Target", "get", "host", "names"]

_TABLES: dict[str, Target] = {t.name: t for t in GPUS}

# Other spellings of the same boards, after normalisation (lowercase, "-" for
# spaces and underscores, "nvidia-", "geforce-", "tesla-" dropped), so that
# torch.cuda.get_device_name() resolves: "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3",
# "Tesla V100-SXM2-32GB", "NVIDIA GeForce RTX 4090". Other variants of a chip
# (A100 40GB, H100 PCIe) have other figures and are deliberately absent.
_ALIASES = {
    "a100-sxm": "a100",
    "a100-sxm4": "a100",
    "a100-80gb": "a100",
    "a100-sxm4-80gb": "a100",
    "h100-sxm": "h100",
    "h100-sxm5": "h100",
    "h100-80gb-hbm3": "h100",
    "h200-sxm": "h200",
    "h200-141gb": "h200",
    "v100-sxm2": "v100",
    "v100-32gb": "v100",
    "v100-sxm2-32gb": "v100",
    "rtx-4090": "rtx4090",
    "4090": "rtx4090",
    "host": "cpu",
}


def names() -> list[str]:
    """Canonical target names, sorted."""
    return sorted([*_TABLES, "cpu"])


def _normalise(name: str) -> str:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    for prefix in ("nvidia-", "geforce-", "tesla-"):
        key = key.removeprefix(prefix)
    return _ALIASES.get(key, key)


def get(target: str | Target) -> Target:
    """The Target called ``target`` (case-insensitive, aliases allowed); a Target is returned as is.

    Raises UnknownTargetError, naming the known targets and the closest one, for any other name.
    """
    if isinstance(target, Target):
        return target
    if not isinstance(target, str):
        raise TypeError(f"a target is a name or a Target, not {type(target).__name__}")
    key = _normalise(target)
    if key == "cpu":
        return host()
    if key in _TABLES:
        return _TABLES[key]
    raise UnknownTargetError(target, names(), gpus=sorted(_TABLES))
