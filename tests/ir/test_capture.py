"""Capture: both paths, the fallback, and clear errors that name the user's line."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import optic


class ShapeBranch(nn.Module):
    """Control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            return self.fc(x)
        return -self.fc(x)


class DataBranch(nn.Module):
    """Control flow on values: no graph can hold it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # the line the error must name
            return y
        return -y


def test_fx_is_the_first_path():
    p = optic.capture(nn.Sequential(nn.Linear(4, 2)), (torch.randn(1, 4),))
    assert p.capture == "fx"
    assert all("tensor_meta" in n.meta for n in p.gm.graph.nodes if n.op != "output")


def test_export_fallback_when_fx_fails_and_it_is_reported():
    x = torch.randn(3, 4)
    m = ShapeBranch()
    opt = optic.optimize(m, (x,), measure=False)
    assert opt.report.capture == "export"
    assert any("fx capture failed" in n for n in opt.report.notes)
    torch.testing.assert_close(opt(x), m(x))


def test_data_dependent_control_flow_names_the_line():
    m = DataBranch()
    line = inspect.getsourcelines(DataBranch.forward)[1] + 2
    with pytest.raises(optic.CaptureError) as err:
        optic.optimize(m, (torch.randn(2, 4),))
    msg = str(err.value)
    assert f"test_capture.py:{line}" in msg
    assert "y.sum() > 0" in msg
    assert "torch.cond" in msg or "torch.where" in msg  # what to do
    assert "Traceback" not in msg


def test_export_path_checks_the_shapes_it_was_specialized_to():
    opt = optic.optimize(ShapeBranch(), (torch.randn(3, 4),), measure=False)
    assert opt.report.capture == "export"
    with pytest.raises(optic.InputMismatchError, match=r"\[3, 4\]"):
        opt(torch.randn(5, 4))


def test_keyword_inputs_and_defaults():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=None, bias: float = 0.0):
            y = self.fc(x)
            if scale is not None:
                y = y * scale
            return y + bias

    m, x = M(), torch.randn(2, 4)
    opt = optic.optimize(m, {"x": x}, measure=False)
    torch.testing.assert_close(opt(x=x), m(x=x))
    s = torch.randn(2, 4)
    opt = optic.optimize(m, (x, s), measure=False)
    torch.testing.assert_close(opt(x, s), m(x, s))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(optic.CaptureError, match="fails on the example inputs"):
        optic.optimize(nn.Linear(4, 2), (torch.randn(3, 5),))
    with pytest.raises(optic.CaptureError, match="example_inputs must be"):
        optic.optimize(nn.Linear(4, 2), 3)
    with pytest.raises(optic.CaptureError, match="nn.Module"):
        optic.optimize(lambda x: x, (torch.randn(1),))


def test_unknown_target_lists_known_ones():
    with pytest.raises(optic.UnknownTargetError) as err:
        optic.optimize(nn.Linear(4, 2), (torch.randn(1, 4),), target="a10")
    assert "a100" in str(err.value) and "cpu" in str(err.value)


def test_gpu_target_runs_exact_passes_and_declines_host_tactics():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    opt = optic.optimize(m, (torch.randn(1, 3, 8, 8),), target="a100")
    assert opt.report.matched("bn_into_conv_or_linear") == 1
    assert "not a CPU" in opt.report.declines("cpu_tactics")[0]["reason"]
    assert opt.report.latency_estimate_s[1] < opt.report.latency_estimate_s[0]


class Counter(nn.Module):
    """Updates a buffer in forward, and its output depends on the update."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x) * self.calls


class Tally(nn.Module):
    """Updates a buffer in forward that its output does not read."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(x.shape[0])
        return self.fc(x)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_buffer_updated_in_forward_is_named_not_blamed_on_control_flow(method):
    with pytest.raises(optic.CaptureError) as err:
        optic.optimize(Counter(), (torch.randn(2, 4),), capture=method, measure=False)
    msg = str(err.value)
    assert "'calls'" in msg and "in place" in msg
    assert "control flow was probably specialized" not in msg


def test_a_buffer_update_the_output_does_not_read_is_kept_and_noted():
    m = Tally()
    x = torch.randn(2, 4)
    o = optic.optimize(m, (x,), measure=False)
    assert any("'seen'" in n and "in place" in n for n in o.report.notes)
    torch.testing.assert_close(o(x), m(x))
    assert float(m.seen) == 2  # the user's model counts only its own call
