"""A zoo of models to optimize and check: plain torch.nn models and Hugging Face ones.

from benchmarks.zoo import get, names
entry = get("resnet18")
model = entry.factory()
out = model(*entry.inputs(2))
"""

from __future__ import annotations

from .common import max_abs_diff, output_tensors, randomize_norms
from .registry import ENTRIES, ZooEntry, get, names

__all__ = ["ENTRIES", "ZooEntry", "get", "max_abs_diff", "names", "output_tensors", "randomize_norms"]
