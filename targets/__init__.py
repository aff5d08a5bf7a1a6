"""Hardware descriptions by name: the GPU tables and the detected host CPU.

>>> get("a100").smem_per_block
166912
>>> get("NVIDIA GeForce RTX 4090") is get("rtx4090")
True

``"cuda"`` (or ``"cuda:N"``, ``"gpu"``) is the GPU this process sees, detected (:mod:`.cuda`); on a
machine without one it is an error that names the GPUs to plan for instead.
"""

from __future__ import annotations

import re

from optic.errors import OpticError, UnknownTargetError

from . import cuda
from .cpu import host
from .gpus import GPUS
from .target import Target

__all__ = ["Target", "get", "host", "local_gpu", "names", "table_for"]

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


def table_for(name: str) -> Target | None:
    """The table row of a GPU called ``name`` (as CUDA reports it, or an alias), or None."""
    return _TABLES.get(_normalise(name))


_LOCAL_GPU = re.compile(r"^(?:cuda|gpu)(?::(\d+))?$")


def local_gpu(index: int = 0) -> Target:
    """The GPU this process sees (``target="cuda"``); an :class:`OpticError` naming the GPU tables when
    PyTorch sees none."""
    try:
        return cuda.detect(index, table_for)
    except cuda.NoGPUError as e:
        raise OpticError(f"target 'cuda' means this machine's GPU, and {e}. To plan for a GPU that is not here, "
                         f"name it: one of {', '.join(sorted(_TABLES))} (`optic targets` lists their figures); "
                         "for this CPU use target='cpu'") from None


def get(target: str | Target) -> Target:
    """The Target called ``target`` (case-insensitive, aliases allowed); a Target is returned as is.

    Raises UnknownTargetError, naming the known targets and the closest one, for any other name.
    """
    if isinstance(target, Target):
        return target
    if not isinstance(target, str):
        raise TypeError(f"a target is a name or a Target, not {type(target).__name__}")
    key = _normalise(target)
    local = _LOCAL_GPU.match(key)
    if local:
        return local_gpu(int(local.group(1) or 0))
    if key == "cpu":
        return host()
    if key in _TABLES:
        return _TABLES[key]
    raise UnknownTargetError(target, names(), gpus=sorted(_TABLES))
