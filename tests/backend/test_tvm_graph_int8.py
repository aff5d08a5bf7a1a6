"""A quantized graph as one TVM program (optic.backend.tvm_graph with optic.backend.int8_amx's kernels).

Property: the program computes the same integers as the same kernels called one by one from PyTorch
(:func:`optic.backend.int8_amx.use_kernels`), bit for bit, on any CNN the quantize pass makes int8, on
the example and on other inputs; and it stays within one requantization step of oneDNN's kernels.
Plus the declines (an int8 layer the kernels do not cover) and the CPU step offering it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from helpers import ResidualBlock, int8_program
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from hypothesis_profiles import examples

pytest.importorskip("tvm")

from optic.backend import int8, int8_amx, tvm_graph  # noqa: E402

pytestmark = pytest.mark.skipif(int8_amx.unavailable() is not None, reason=str(int8_amx.unavailable()))


class Net(nn.Module):
    """A ResNet block, a 1x1 stride-2 projection, max pooling and a classifier: every int8 layer kind the
    kernels fuse (a float input quantized in the kernel, a uint8 input, a uint8 or float residual, ReLU,
    requantized or float outputs, a linear)."""

    def __init__(self, c: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.blk = ResidualBlock(head=False)
        self.down = nn.Conv2d(16, c, 1, 2)
        self.fc = nn.Linear(c * 4 * 4, 10)

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(torch.relu(self.down(self.blk(x))), 2)
        return self.fc(y.flatten(1))


def _flat(gm: fx.GraphModule) -> fx.GraphModule:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], tuple):
        out.args = ((out.args[0],),)
    gm.recompile()
    return gm


def _per_call(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its int8 layers run by the same kernels one call at a time from PyTorch."""
    other = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    assert int8_amx.use_kernels(other, 0)
    return other


def _program(prog) -> tvm_graph.TVMGraph:
    g = tvm_graph.TVMGraph(_flat(copy.deepcopy(prog.gm)))
    g.build(prog.example_args, 0)
    return g


def test_a_quantized_network_is_one_program_computing_the_kernels_integers():
    x = torch.randn(2, 3, 16, 16)
    prog = int8_program(Net().eval(), x)
    g = _program(prog)
    kinds = [k.what for k in g.kernels]
    assert sum(k.source == "int8" for k in g.kernels) == 5, kinds  # stem, a, b, down and fc: each an int8 kernel
    per_call = _per_call(_flat(copy.deepcopy(prog.gm)))
    with torch.no_grad():
        for inp in (x, torch.randn_like(x) * 2, torch.zeros_like(x)):
            want, got = per_call(inp)[0], g(inp)[0]
            assert g.failed is None, g.failed
            assert torch.equal(want, got), (want - got).abs().max()
            # oneDNN's kernels (the graph as quantize made it): the same within a requantization step
            ref = prog.gm(inp)
            ref = ref[0] if isinstance(ref, tuple) else ref
            assert (ref - got).abs().max() <= 0.05 * ref.abs().max() + 1e-6


@st.composite
def quantized_cnn(draw):
    torch.manual_seed(draw(st.integers(0, 2**16)))
    c, layers, size = 3, [], draw(st.sampled_from([8, 9, 12]))
    hw = size
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.sampled_from([1, 3]))
        stride = draw(st.sampled_from([1, 2])) if size >= 6 else 1
        c_out = draw(st.sampled_from([8, 16, 20, 32]))
        layers += [nn.Conv2d(c, c_out, k, stride, k // 2), nn.ReLU()] if draw(st.booleans()) else [
            nn.Conv2d(c, c_out, k, stride, k // 2)]
        c, size = c_out, (size + 2 * (k // 2) - k) // stride + 1
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return nn.Sequential(*layers).eval(), torch.randn(draw(st.integers(1, 3)), 3, hw, hw)


@examples(8, suppress_health_check=[HealthCheck.too_slow])
@given(case=quantized_cnn())
def test_any_quantized_cnn_computes_the_same_integers_as_its_kernels_called_one_by_one(case):
    model, x = case
    prog = int8_program(model, x)
    g = _program(prog)
    per_call = _per_call(_flat(copy.deepcopy(prog.gm)))
    with torch.no_grad():
        for inp in (x, torch.randn_like(x) * 3):
            got = g(inp)[0]
            assert g.failed is None, g.failed
            assert torch.equal(per_call(inp)[0], got)


def test_an_int8_layer_the_kernels_do_not_cover_is_declined_naming_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(16 * 64, 4)).eval()
    prog = int8_program(model, torch.randn(1, 3, 8, 8))
    grouped = [n for n in prog.gm.graph.nodes if n.target is int8.CONV and n.args[9] != 1]
    if not grouped:
        pytest.skip("the quantize pass left the grouped convolution in float32")
    why = tvm_graph.check(prog.gm)
    assert why is not None and grouped[0].name in why and "groups" in why


def test_the_cpu_step_offers_the_program_for_a_quantized_graph():
    """The CPU step times the int8 program beside Inductor's and the per-call kernels, each checked first."""
    from optic import targets
    from optic.backend.vendor import CpuTactics
    from optic.pipeline.runner import PassContext

    x = torch.randn(1, 3, 16, 16)
    prog = int8_program(Net().eval(), x)
    before = copy.deepcopy(prog.gm)
    from optic.ir.rewrite import RuleStats
    from optic.pipeline.report import PassRecord

    ctx = PassContext(target=targets.get("cpu"), measure=True, options={"whole_graph": "tvm"})
    ctx.check_inputs = [((x,), {})]
    ctx.tolerance = 1e-2
    ctx.stats, ctx.record = RuleStats(), PassRecord("cpu_tactics", True)
    variants = CpuTactics._tvm_graph(prog, ctx)
    assert list(variants) == [tvm_graph.NAME]
    with torch.no_grad():
        got, want = variants[tvm_graph.NAME].gm(x), before(x)
        want = want[0] if isinstance(want, tuple) else want
        assert (got - want).abs().max() <= 0.05 * want.abs().max() + 1e-6
    assert sum(k["source"] == "int8" for k in ctx.record.measured["tvm_kernels"]) == 5
