"""The optimized module keeps the original's call contract: its signature (optional arguments,
positional or by keyword) and its output types (named tuples, dataclasses, ``ModelOutput``, dicts,
nested containers), on both capture paths."""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import torch.nn as nn

import optic
from optic.errors import InputMismatchError
from optic.pipeline.verify import compare


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.l(x)
        return y if mask is None else y.masked_fill(~mask, 0.0)


def _opt(model, example, capture, **kw):
    return optic.optimize(model, example, capture=capture, measure=False, **kw)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_optional_argument_left_out_of_the_example_is_never_ignored(capture):
    m = OptionalMask().eval()
    x = torch.randn(2, 4)
    o = _opt(m, (x,), capture)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    for call in (lambda f: f(x, mask), lambda f: f(x, mask=mask)):
        with pytest.raises(InputMismatchError, match="'mask'"):
            call(o)
    # the value it was captured with still works, however it is spelled
    torch.testing.assert_close(o(x), m(x))
    torch.testing.assert_close(o(x, None), m(x))
    torch.testing.assert_close(o(x, mask=None), m(x))
    torch.testing.assert_close(o(x=x), m(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_optional_argument_in_the_example_is_taken_positionally_or_by_keyword(capture):
    m = OptionalMask().eval()
    x = torch.randn(2, 4)
    mask = torch.rand(2, 4) > 0.5
    o = _opt(m, (x, mask), capture)
    other = torch.rand(2, 4) > 0.5
    torch.testing.assert_close(o(x, other), m(x, other))
    torch.testing.assert_close(o(x, mask=other), m(x, mask=other))
    torch.testing.assert_close(o(mask=other, x=x), m(x, other))
    with pytest.raises(InputMismatchError, match="'mask'"):
        o(x)  # captured with a mask: leaving it out would silently mean something else


def test_the_guard_that_protects_a_specialized_argument_survives_the_passes():
    o = _opt(OptionalMask().eval(), (torch.randn(2, 4),), "fx")
    targets = [getattr(n.target, "__name__", str(n.target)) for n in o.graph_module.graph.nodes]
    assert "_assert_is_none" in targets


def test_optimized_module_has_the_original_signature():
    import inspect

    o = _opt(OptionalMask().eval(), (torch.randn(2, 4),), "fx")
    assert list(inspect.signature(o).parameters) == ["x", "mask"]


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x, scale: float = 1.0, *, shift: int = 0):
        return self.l(x) * scale + shift


def test_export_specializes_python_values_and_refuses_others():
    m = Scaled().eval()
    x = torch.randn(2, 4)
    o = _opt(m, (x, 2.0), "export")
    torch.testing.assert_close(o(x, 2.0), m(x, 2.0))
    with pytest.raises(InputMismatchError, match="'scale'"):
        o(x, 3.0)
    with pytest.raises(InputMismatchError, match="'shift'"):
        o(x, 2.0, shift=1)


def test_a_call_the_signature_does_not_allow_is_a_clear_error():
    o = _opt(OptionalMask().eval(), (torch.randn(2, 4),), "fx")
    with pytest.raises(InputMismatchError, match="forward"):
        o(torch.randn(2, 4), None, None)
    with pytest.raises(InputMismatchError, match="'y'"):
        o(torch.randn(2, 4), y=1)


# -- output types --------------------------------------------------------------------------
@dataclasses.dataclass
class DataOut:
    logits: torch.Tensor
    hidden: torch.Tensor
    tag: str = "x"


NT = collections.namedtuple("NT", "a b")


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)


class ReturnsModelOutput(Base):
    def forward(self, x):
        from transformers.modeling_outputs import SequenceClassifierOutput

        y = self.l(x)
        return SequenceClassifierOutput(logits=y, hidden_states=(y.relu(), y.tanh()))


class ReturnsDataclass(Base):
    def forward(self, x):
        y = self.l(x)
        return DataOut(y, y.relu())


class ReturnsNested(Base):
    def forward(self, x):
        y = self.l(x)
        return NT(y, {"k": [y.relu(), (y * 2, DataOut(y.tanh(), y.sigmoid()))]})


class ReturnsDict(Base):
    def forward(self, x):
        y = self.l(x)
        return {"b": y.relu(), "a": y}


def _same_structure(a, b):
    assert type(a) is type(b), f"{type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _same_structure(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same_structure(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _same_structure(u, v)
    else:
        assert a == b


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("cls", [ReturnsModelOutput, ReturnsDataclass, ReturnsNested, ReturnsDict])
def test_output_types_survive(cls, capture):
    m = cls().eval()
    x = torch.randn(2, 4)
    o = _opt(m, (x,), capture)
    want, got = m(x), o(x)
    _same_structure(want, got)
    if cls is ReturnsModelOutput:
        torch.testing.assert_close(got.logits, want.logits)


def test_verification_compares_dataclasses_field_by_field():
    a = DataOut(torch.ones(3), torch.zeros(3))
    assert compare(a, DataOut(torch.ones(3), torch.zeros(3)), 1e-6).ok
    assert not compare(a, DataOut(torch.ones(3), torch.ones(3)), 1e-6).ok
    assert not compare(a, DataOut(torch.ones(3), torch.zeros(3), tag="y"), 1e-6).ok
