"""Device residency: every tensor optic makes follows the examples' device; GPU tactics run only on the GPU.

No GPU here: torch's *default* device is set to ``meta`` while a CPU model is optimized. A tensor made
without naming its device (``torch.randn(shape)``) then lands on ``meta`` and the first op mixing it
with the model's tensors fails, so any such call (the bug that keeps a CUDA model from being verified
on CUDA inputs) shows as a pass rolled back or an exception here.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optic
from optic.backend import gpu_tactics
from optic.errors import OpticError
from optic.pipeline.verify import compare


@contextlib.contextmanager
def default_device(dev):
    torch.set_default_device(dev)
    try:
        yield
    finally:
        torch.set_default_device(None)


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


class Attn(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.qkv, self.out, self.norm = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        return x + self.out(F.scaled_dot_product_attention(q, k, v))


def _no_crash(report):
    crashed = [(p.name, p.reason) for p in report.passes if p.rolled_back and "raised" in str(p.reason)]
    assert not crashed, crashed


@pytest.mark.parametrize("passes", [
    ["fold_norm", "lowrank", "prune", "sparse24", "quantize", "precision", "early_exit"],
    pytest.param("default", marks=pytest.mark.slow)])  # with the CPU step's compiles: a minute
def test_every_tensor_optic_makes_follows_the_examples_device_through_the_budgeted_passes(passes):
    m, x = _cnn(), torch.randn(8, 3, 12, 12)
    cal = [(torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))) for _ in range(6)]
    with default_device("meta"):
        r = optic.optimize(m, x, passes=passes, budget=optic.Budget(max_drop=0.05, metric="agreement"),
                             calibration=cal, options={"tactics_confirm_s": 0.2, "tactics_budget_s": 0.5})
    _no_crash(r.report)
    ran = {p.name for p in r.report.passes if not p.skipped}
    assert {"fold_norm", "lowrank", "prune", "quantize", "precision", "early_exit"} <= ran
    with torch.no_grad():
        assert r(x).device.type == "cpu"


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_both_captures_and_the_checks_follow_the_examples_device(capture):
    m, x = Attn().eval(), torch.randn(2, 5, 32)
    with default_device("meta"):
        r = optic.optimize(m, x, capture=capture, measure=False)
    _no_crash(r.report)
    with torch.no_grad():
        assert compare(m(x), r(x), 1e-4).ok


# -- where the model and its examples are ---------------------------------------------------------------
def test_examples_on_a_device_optic_cannot_run_are_a_clear_error():
    with pytest.raises(OpticError, match="example inputs are on meta; optic optimizes models on the CPU or on a CUDA"):
        optic.optimize(nn.Linear(4, 4), torch.randn(2, 4, device="meta"))


def test_weights_and_examples_on_two_devices_are_a_clear_error():
    with pytest.raises(OpticError, match=r"weights are on meta and its example inputs on cpu.*model.to\(x.device\)"):
        optic.optimize(nn.Linear(4, 4, device="meta"), torch.randn(2, 4))


def test_cuda_examples_with_a_cpu_target_say_what_to_use_instead(monkeypatch):
    from optic import api, device

    monkeypatch.setattr(device, "of", lambda tree: torch.device("cuda", 0))
    monkeypatch.setattr(device, "of_module", lambda m: torch.device("cuda", 0))
    with pytest.raises(OpticError, match="are on cuda:0, and target 'cpu' is a CPU: use target='cuda'"):
        api._device_checked(nn.Linear(4, 4), torch.randn(2, 4), None, optic.targets.get("cpu"))


def test_only_the_targets_hardware_is_measured():
    from optic.api import _measurable

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    a100, host = optic.targets.get("a100"), optic.targets.get("cpu")
    assert _measurable(host, cpu) and _measurable(a100, cuda)
    assert not _measurable(a100, cpu) and not _measurable(host, cuda)


# -- gpu_tactics ------------------------------------------------------------------------------------------
def test_backend_flags_hold_for_the_call_only_even_when_it_fails():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    with gpu_tactics.backend_flags(tf32=not before[0], cudnn_benchmark=not before[2]):
        assert torch.backends.cuda.matmul.allow_tf32 == (not before[0])
        assert torch.backends.cudnn.benchmark == (not before[2])
    with pytest.raises(ValueError), gpu_tactics.backend_flags(tf32=True, cudnn_benchmark=True):
        raise ValueError("the call failed")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark) == before


def test_a_forced_sdpa_backend_computes_the_same_and_cuda_graphs_leave_cpu_calls_alone():
    m, x = Attn().eval(), torch.randn(2, 5, 32)
    gm = optic.capture(m, (x,), method="fx").gm
    assert gpu_tactics.has_sdpa(gm)
    with torch.no_grad():
        ref = m(x)
        assert torch.equal(gpu_tactics.DeviceSettings(gm, sdpa="MATH")(x), gm(x))
        assert compare(ref, gpu_tactics.DeviceSettings(gm, sdpa="MATH")(x), 1e-5).ok
        graphed = gpu_tactics.CudaGraphed(gm)
        assert torch.equal(graphed(x), gm(x)) and not graphed._captured  # CPU tensors: run as the graph is
    assert not gpu_tactics.has_sdpa(optic.capture(_cnn(), (torch.randn(1, 3, 8, 8),), method="fx").gm)


def test_gpu_tactics_decline_saying_why_when_the_model_is_not_on_the_gpu():
    r = optic.optimize(_cnn(), torch.randn(1, 3, 8, 8), target="h100")
    rec = r.report.pass_record("gpu_tactics")
    assert not rec.changed and "not on a CUDA device" in rec.declined[0]["reason"]
    r = optic.optimize(_cnn(), torch.randn(1, 3, 8, 8))
    assert "gpu_tactics" not in [p.name for p in r.report.passes]  # a CPU target never runs it


def test_the_inductor_variant_leaves_cpu_calls_to_the_graph_and_pickles_without_its_compile():
    import pickle

    m, x = Attn().eval(), torch.randn(2, 5, 32)
    gm = optic.capture(m, (x,), method="fx").gm
    compiled = gpu_tactics.InductorGraph(gm)
    with torch.no_grad():
        assert torch.equal(compiled(x), gm(x)) and compiled._compiled is None  # CPU tensors: not compiled
    compiled._compiled = object()
    assert pickle.loads(pickle.dumps(compiled))._compiled is None


def test_channels_last_on_the_gpu_takes_half_precision_convolutions_too():
    from optic.backend.vendor import to_channels_last

    m = _cnn().to(torch.bfloat16)
    x = torch.randn(1, 3, 8, 8, dtype=torch.bfloat16)
    prog = optic.capture(m, (x,), method="fx")
    assert to_channels_last(prog.clone().gm) == 0  # the CPU step: float32 only
    gm = prog.clone().gm
    assert to_channels_last(gm, gpu_tactics.HALF_AND_FULL) == 2
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))
