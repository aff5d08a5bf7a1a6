"""An optimized module is an nn.Module a user can keep: it deep-copies, pickles, exports, and refuses
clearly what it cannot do (a dtype or device its kernels are not built for; gradients through kernels
without autograd), whatever tactics the pipeline kept."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn

import optic
from optic.backend import vendor as cpu_tactics
from optic.errors import OpticError
from optic.pipeline import final


class SmallCNN(nn.Module):
    """Annotated forward in a file with ``from __future__ import annotations`` (string annotations)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv1(x)))
        y = torch.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


@pytest.fixture
def onednn_kept(monkeypatch):
    """cpu_tactics keeps every oneDNN kernel and variant, whatever the clock says (the choice is not
    what these tests are about; what the kept kernels allow is)."""
    monkeypatch.setattr(cpu_tactics.CpuTactics, "_measure", staticmethod(lambda c, gm, values, ctx: (True, "")))
    monkeypatch.setattr(cpu_tactics.CpuTactics, "_fastest",
                        staticmethod(lambda variants, program, ctx: next(k for k in variants if "oneDNN" in k)))
    monkeypatch.setattr(final, "never_slower", lambda original, result, *a, **k: result)


def _model_and_input():
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    return m, torch.randn(2, 3, 12, 12)


def _onednn_ops(o) -> int:
    return sum(str(getattr(n.target, "__module__", "")).endswith("mkldnn") or "mkldnn" in str(n.target)
               for n in o.graph_module.graph.nodes)


@pytest.fixture
def optimized(onednn_kept):
    m, x = _model_and_input()
    o = optic.optimize(m, (x,))
    assert _onednn_ops(o) >= 2, o.graph_module.code  # the kernels these tests are about are there
    return m, x, o


def test_deepcopy_and_pickle_keep_the_results(optimized):
    m, x, o = optimized
    want = m(x)
    c = copy.deepcopy(o)
    torch.testing.assert_close(c(x), want, rtol=1e-4, atol=1e-5)
    buf = io.BytesIO()
    torch.save(o, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)
    assert _onednn_ops(loaded) == _onednn_ops(o)
    assert loaded.report.passes  # the report travels along
    torch.testing.assert_close(o(x), want, rtol=1e-4, atol=1e-5)  # the original result still works


def test_state_dict_holds_plain_tensors(optimized):
    _, _, o = optimized
    for name, t in o.state_dict().items():
        assert not t.is_mkldnn, name


def test_a_dtype_or_device_the_kernels_are_not_built_for_is_a_clear_error(optimized):
    m, x, o = optimized
    for convert in (lambda mod: mod.half(), lambda mod: mod.double(), lambda mod: mod.to(torch.bfloat16)):
        with pytest.raises(OpticError, match="cpu_tactics"):
            convert(o)
    o.float()  # what it already is: fine
    torch.testing.assert_close(o(x), m(x), rtol=1e-4, atol=1e-5)  # a refused conversion changed nothing


def test_the_result_exports(optimized):
    m, x, o = optimized
    ep = torch.export.export(o, (x,), strict=False)
    torch.testing.assert_close(ep.module()(x), m(x), rtol=1e-4, atol=1e-5)


def test_gradients_through_kernels_without_autograd_are_refused_not_silently_none(optimized):
    _, x, o = optimized
    with pytest.raises(OpticError, match="gradient"):
        o(x.clone().requires_grad_())
    with torch.no_grad():
        o(x.clone().requires_grad_())  # no gradient asked for: fine


def test_gradients_with_respect_to_inputs_are_right_without_opaque_kernels():
    m, x = _model_and_input()
    o = optic.optimize(m, (x,), measure=False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    m(xa).square().sum().backward()
    o(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in o.parameters())  # an inference result: nothing to train here
    assert all(p.requires_grad for p in m.parameters())  # the user's model is untouched


def test_an_fx_result_from_a_file_with_string_annotations_pickles():
    m, x = _model_and_input()
    o = optic.optimize(m, (x,), measure=False)
    assert o.report.capture == "fx"
    buf = io.BytesIO()
    torch.save(o, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), m(x), rtol=1e-4, atol=1e-5)


class ShapeDependent(nn.Module):
    """fx cannot trace the branch on a shape; torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float = 2.0):
        return self.fc(x) * (scale if x.shape[0] > 1 else 1.0)


def test_an_export_result_deep_copies_and_pickles():
    m, x = ShapeDependent().eval(), torch.randn(3, 4)
    o = optic.optimize(m, (x,), measure=False)
    assert o.report.capture == "export"
    buf = io.BytesIO()
    torch.save(copy.deepcopy(o), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), m(x))
    with pytest.raises(optic.InputMismatchError, match="'scale'"):
        loaded(x, 3.0)  # the signature check travels along
