"""Small helpers for pass tests: op kinds of a graph in order, and optimizing with the exact passes."""

from __future__ import annotations

import torch

import optic
from optic.ir.opview import view
from optic.pipeline.verify import compare


def op_kinds(gm) -> list[str]:
    """The op-view kind of every op node, in graph order (activations as act:<fn>)."""
    out = []
    for n in gm.graph.nodes:
        op = view(n, gm)
        if op is not None:
            out.append(f"act:{op.attrs['fn']}" if op.kind == "act" else op.kind)
        elif n.op in ("call_function", "call_method", "call_module"):
            out.append(str(getattr(n.target, "__name__", n.target)))
    return out


def run_exact(model, inputs, capture="fx", passes=("cleanup", "fold_norm", "fuse"), **kw):
    """Optimize with the exact passes (no timing) and check the result against the model."""
    opt = optic.optimize(model, inputs, passes=list(passes), capture=capture, measure=False, **kw)
    with torch.no_grad():
        c = compare(model(*inputs), opt(*inputs), 1e-4)
    assert c.ok, str(c)
    return opt


def int8_program(model, x, method="fx", smoothed=False):
    """``model`` captured (``method``) with every layer the quantize pass proposes applied in int8 (no
    budget: all of them; ``smoothed``: the smoothed variant where one is proposed, else the plain one),
    calibrated on four seeded random batches shaped like ``x``."""
    from optic import targets
    from optic.backend import int8
    from optic.budget.allocator import build
    from optic.budget.calibration import Budget, split
    from optic.ir.capture import capture
    from optic.pipeline.registry import get
    from optic.pipeline.runner import PassContext

    prog = capture(model, (x,), method=method)
    g = torch.Generator().manual_seed(1)
    cal = split([torch.randn(x.shape, generator=g) for _ in range(4)], Budget(), single_input=True,
                batch_size=x.shape[0])
    ctx = PassContext(target=targets.get("cpu"), measure=True, calibration=cal, options={"quantize_min_macs": 0})
    from optic.passes.quantize import one_per_layer

    out = build(prog, one_per_layer(get("quantize").candidates(prog, ctx), smoothed))
    assert any(n.target in int8.OUT_ARGS for n in out.gm.graph.nodes)
    return out


class ResidualBlock(torch.nn.Module):
    """A ResNet block after a stem: the block's input is read by its first conv and by the residual add;
    ``head``: a 1x1 conv after the block's ReLU (else the block's output is returned)."""

    def __init__(self, head: bool = True):
        super().__init__()
        nn = torch.nn
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 8, 1) if head else nn.Identity()

    def forward(self, x):
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.b(torch.relu(self.a(h))) + h))

