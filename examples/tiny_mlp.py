"""A two-layer MLP: the smallest model to try the CLI on.

    optic dump examples/tiny_mlp.py:Model
    optic optimize examples/tiny_mlp.py:Model --target cpu
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


example_inputs = (torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),)
