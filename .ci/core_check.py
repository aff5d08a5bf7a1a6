"""The core install works on its own: ``pip install optic`` with no extras, in a venv of its own.

.ci/run installs torch and optic (no extras) into a fresh venv and runs this file with it. It
optimizes a conv+bn+relu model and an MLP on this CPU, checks their outputs against the originals'
(max error within 1e-4 of the output scale), and checks that what needs an extra says which one.
Not a pytest file: it must run where pytest and the extras are absent.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

import optic

EXTRAS_ONLY = ["tvm", "tvm_ffi", "tornado", "cloudpickle", "psutil", "xgboost", "transformers", "matplotlib",
               "onnxruntime", "pytest", "hypothesis"]


def optimized(model: nn.Module, x: torch.Tensor) -> optic.OptimizedModule:
    """``optic.optimize(model, (x,))``, checked against the model's own output."""
    with torch.no_grad():
        ref = model(x)
        result = optic.optimize(model, (x,))
        out = result(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err <= 1e-4, f"{type(model).__name__}: max error {err:.2e} of the output scale (> 1e-4)"
    assert result.report.passes, "the report lists no pass"
    return result


def main() -> None:
    present = [m for m in EXTRAS_ONLY if importlib.util.find_spec(m) is not None]
    assert not present, f"not a core install: {present} installed"
    here = Path(optic.__file__).resolve().parent
    assert "site-packages" in here.parts, f"optic imported from {here}, not from the install"
    assert optic.__version__ == importlib.metadata.version("optic")
    assert (here / "py.typed").is_file(), "py.typed is not installed"

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    bn = conv[1]  # statistics of a trained model, so that folding changes the weights
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    result = optimized(conv, torch.randn(2, 3, 16, 16))
    folded = [r for r in result.report.passes if r.name == "fold_norm"]
    assert folded and folded[0].changed and not folded[0].rolled_back, "the batch norm was not folded"

    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(4, 16)
    optimized(mlp, x)

    try:
        optic.optimize(mlp, (x,), backend="tvm")
    except optic.OpticError as e:
        assert "optic[tvm]" in str(e), f"backend='tvm' without TVM does not name the extra: {e}"
    else:
        raise AssertionError("backend='tvm' worked without TVM installed")

    # the console script: `python -m optic`, run in the checkout, would import the checkout's optic/
    script = Path(sys.executable).parent / "optic"
    cli = subprocess.run([str(script), "targets", "--json"], capture_output=True, text=True, check=True)
    assert "cpu" in {t["name"] for t in json.loads(cli.stdout)}, "optic targets does not list the host CPU"
    print(f"core install of optic {optic.__version__} (torch {torch.__version__}): ok")


if __name__ == "__main__":
    main()
