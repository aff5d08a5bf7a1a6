"""``optic.save`` and ``optic.load``: an optimized module to a file and back, on this machine or another.

The file is one ``torch.save`` archive holding the module (graph, weights, report, call contract) and what
it was made on. What depends on the machine is never stored in a form that could run wrong elsewhere:

- oneDNN's prepacked weights travel as the plain weights they were packed from and are packed again on
  first use (:class:`optic.backend.vendor.PackedConvWeight`);
- optic's int8 kernels hold plain int8 weights; oneDNN's packed form is a per-process cache;
- the whole graph compiled by Inductor is compiled again on first use; an AOTInductor package travels as
  its bytes and is built again when the machine that loads it differs (another CPU model, other vector
  extensions, another torch);
- TVM-generated kernels travel as their compiled library (a shared object) with the machine it was built for,
  and their tuning records (operator and tile configuration): loaded on a machine like it, the library
  runs as saved; elsewhere (or where it does not load) the kernel is compiled again from its records on
  first use. The tuning database is not needed.

Loading unpickles the file: load only files you trust (as with ``torch.load(weights_only=False)``).
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import types
from pathlib import Path
from typing import Any

import torch

from .errors import OpticError

FORMAT = "optic.OptimizedModule/1"

# Modules that moved since files of this format were first written (the core's subpackages): a file saved
# before names its classes by the old paths, and still loads.
MOVED = {
    **{f"optic.{m}": f"optic.ir.{m}" for m in ("opview", "rewrite", "emit", "program", "capture", "dynamic",
                                               "contract")},
    "optic.ir": "optic.ir.graph",
    "optic.pipeline": "optic.pipeline.runner",
    **{f"optic.{m}": f"optic.pipeline.{m}" for m in ("registry", "verify", "timing", "cost", "report", "health")},
    "optic.budget": "optic.budget.allocator",
    "optic.calibration": "optic.budget.calibration",
    **{f"optic.{m}": f"optic.backend.{m}" for m in ("lower", "partition", "kernels", "artifact", "int8")},
    "optic.channels": "optic.passes.prune.channels",
    "optic.segments": "optic.passes.early_exit.segments",
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module not in MOVED:
                raise
            return super().find_class(MOVED[module], name)


# what torch.load(pickle_module=...) uses: pickle with the moved paths followed
_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, load=lambda f, **kw: _Unpickler(f, **kw).load(),
                                __name__="optic.saving")


def save(result: Any, path: str | os.PathLike) -> Path:
    """Write ``result`` (what ``optic.optimize`` returned) to ``path``; returns the path."""
    from . import __version__
    from .api import OptimizedModule
    from .hf import OptimizedHF
    from .targets.cpu import host_fingerprint

    if not isinstance(result, OptimizedModule | OptimizedHF):
        raise OpticError(f"optic.save writes what optic.optimize returns (an OptimizedModule); got "
                         f"{type(result).__name__}. Save other modules with torch.save.")
    out = Path(path)
    if out.is_dir():
        raise OpticError(f"{out} is a directory: give a file path, e.g. {out / 'model.optic.pt'}")
    payload = {
        "format": FORMAT,
        "optic": __version__,
        "torch": torch.__version__,
        "machine": host_fingerprint(),
        "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "module": result,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".optic-save-", dir=out.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, out)  # a reader never sees half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def load(path: str | os.PathLike) -> Any:
    """The optimized module saved at ``path`` by :func:`save`, with its report (a note says where and when it
    was saved, and what is rebuilt for this machine)."""
    from .targets.cpu import host_fingerprint

    src = Path(path)
    if not src.is_file():
        raise OpticError(f"{src} does not exist or is not a file (write one with optic.save(result, path))")
    try:
        payload = torch.load(src, weights_only=False, pickle_module=_PICKLE)
    except Exception as e:
        raise OpticError(f"{src} is not a file optic.save wrote ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise OpticError(f"{src} is not a file optic.save wrote (format {found!r}, expected {FORMAT!r}); a module "
                         "saved with torch.save loads with torch.load")
    module = payload["module"]
    here = host_fingerprint()
    note = f"loaded from {src.name}, saved {payload['saved']} with optic {payload['optic']}"
    if payload["machine"] != here:
        note += (f" on another machine ({payload['machine']}); compiled code (whole-graph package, generated "
                 "kernels) is built again for this one on first use")
    module.report.notes.append(note)
    return module
