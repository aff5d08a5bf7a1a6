"""A residual CNN trained on the 8×8 digits, then optimized by optic within a 1 % top-1 budget.

    python examples/digits_cnn.py                    # train (or load), optimize, print the report and figures
    optic optimize examples/digits_cnn.py:build --target cpu

The network is over-parameterized for its task on purpose, as real vision models are relative to
theirs: three stages of residual conv-BN-ReLU blocks (64, 128, 128 channels, 0.62 M parameters,
49 MFLOP per image) on 8×8 inputs reach 99.5 % on the test split after about 35 s of training on
one core. That slack is what the budgeted passes (low rank, pruning, early exit) spend. Its batch-1
latency is mostly the convolutions, not Python overhead: eager, 1.3 ms per image on 2 cores, where
the same graph with 8 channels per stage (no compute to speak of) takes 0.55 ms and half the
channels 0.86 ms, so removing compute shows up as time saved.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
import digits_common as common  # noqa: E402  (a sibling file: examples/ is not a package)
from resnet_bn import BasicBlock as Block  # noqa: E402

NAME = "digits_cnn"
CONFIG = common.TrainConfig(epochs=15, batch_size=64, lr=3e-3, seed=0)


class DigitsCNN(nn.Module):
    """stem (1→w1) at 8×8; stage 1 (w1) at 8×8; stage 2 (w1→w2) at 8×8; stage 3 (w2→w3) at 4×4; pool; linear."""

    def __init__(self, widths: tuple[int, int, int] = (64, 128, 128), num_classes: int = common.NUM_CLASSES):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(nn.Conv2d(1, w1, 3, 1, 1, bias=False), nn.BatchNorm2d(w1), nn.ReLU())
        self.stage1 = Block(w1, w1)
        self.stage2 = Block(w1, w2)
        self.stage3 = Block(w2, w3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build(retrain: bool = False, verbose: bool = False) -> DigitsCNN:
    """The trained model in eval mode (trained here on first use, then loaded from the cache)."""
    return common.trained(NAME, DigitsCNN, CONFIG, (Block, DigitsCNN), on_epoch=common.print_epoch if verbose else None,
                          retrain=retrain)


example_inputs = common.example_inputs  # one calibration image, batch 1 (optic never sees the test split)
calibration = common.calibration  # the calibration split as (x, y) batches: optimize(calibration=...) and --budget


def main(argv: list[str] | None = None) -> common.Outcome:
    """Train (or load), optimize within the budget, print the report and the test-split figures."""
    return common.main(NAME, build, __doc__, argv)


if __name__ == "__main__":
    main()
