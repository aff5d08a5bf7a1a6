"""A small transformer classifier trained on the 8×8 digits, then optimized by optic within a 1 % top-1 budget.

    python examples/digits_transformer.py            # train (or load), optimize, print the report and figures
    optic optimize examples/digits_transformer.py:build --target cpu

Each image is cut into 9 overlapping patches of 4×4 pixels (stride 2), embedded by a strided
convolution as in ViT; a learned position is added, and four pre-norm encoder layers (d = 128, 4 heads, FFN 512, GELU) follow; the
mean over the tokens goes through a LayerNorm and a linear classifier. Attention is written out
(``softmax(q·kᵀ·s)·v``, separate q, k, v projections), the way many model files spell it, so that
optic's ``fuse`` pass has the Q/K/V merge and the attention fusion to find; the model traces with
torch.fx.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
import digits_common as common  # noqa: E402  (a sibling file: examples/ is not a package)

NAME = "digits_transformer"
CONFIG = common.TrainConfig(epochs=30, batch_size=64, lr=2e-3, weight_decay=0.05, seed=0)
PATCH, STRIDE = 4, 2


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    """Pre-norm: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ffn(self.norm2(x)))


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 128, depth: int = 4, heads: int = 4, ffn: int = 512, dropout: float = 0.1,
                 num_classes: int = common.NUM_CLASSES):
        super().__init__()
        tokens = ((8 - PATCH) // STRIDE + 1) ** 2
        self.embed = nn.Conv2d(1, dim, PATCH, STRIDE)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, ffn, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [b, 1, 8, 8] -> [b, dim, 3, 3] -> [b, 9, dim]
        h = self.layers(tokens + self.pos)
        return self.head(self.norm(h.mean(dim=1)))


def build(retrain: bool = False, verbose: bool = False) -> DigitsTransformer:
    """The trained model in eval mode (trained here on first use, then loaded from the cache)."""
    return common.trained(NAME, DigitsTransformer, CONFIG, (Attention, EncoderLayer, DigitsTransformer),
                          on_epoch=common.print_epoch if verbose else None, retrain=retrain)


example_inputs = common.example_inputs  # one calibration image, batch 1 (optic never sees the test split)
calibration = common.calibration  # the calibration split as (x, y) batches: optimize(calibration=...) and --budget


def main(argv: list[str] | None = None) -> common.Outcome:
    """Train (or load), optimize within the budget, print the report and the test-split figures."""
    return common.main(NAME, build, __doc__, argv)


if __name__ == "__main__":
    main()
