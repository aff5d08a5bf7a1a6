"""The zoo through the exact pipeline (tactics measured off: timing belongs to benchmarks):
right capture path, outputs match eager, every foldable BN folded, Q/K/V fused, attention on SDPA, and
the result saved and loaded again (optic.save / optic.load) computes the same with its report."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import op_kinds

import optic
from benchmarks.zoo import get, names
from optic.pipeline.verify import compare

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything
# Hugging Face models here are small configs (seconds each): they run by default, being what real
# users bring; the full-size plain-torch ones are marked slow.
FAST = [n for n in names() if not get(n).slow or get(n).source == "hf"]
SLOW = [n for n in names() if n not in FAST]
SEPARATE_QKV = {"tiny_transformer", "vit_s16", "bert_base", "hf_bert", "hf_bert_sdpa", "hf_llama", "hf_vit", "hf_swin"}


def _check(name, tmp_path):
    entry = get(name)
    model, inputs = entry.factory(), entry.inputs(1)
    opt = optic.optimize(model, inputs, measure=False)
    rep = opt.report
    assert rep.capture == entry.capture
    assert not [p for p in rep.passes if p.rolled_back]
    with torch.no_grad():
        c = compare(model(*inputs), opt(*inputs), rep.tolerance)
    assert c.ok, str(c)
    kinds = op_kinds(opt.program.gm)
    if entry.has_bn:
        left = kinds.count("batch_norm") + kinds.count("addcmul.default")
        declined = [d for d in rep.declines("bn_into_conv_or_linear")]
        assert left == len(declined), f"{left} BN left, but only {len(declined)} declines explain why"
        assert rep.matched("bn_into_conv_or_linear") >= 1
    if entry.family == "transformer":
        assert "softmax" not in kinds, "attention not on SDPA"
        assert kinds.count("sdpa") >= 1
    if name in SEPARATE_QKV:
        assert rep.matched("horizontal_linear") >= 1
    loaded = optic.load(optic.save(opt, tmp_path / f"{name}.optic.pt"))
    with torch.no_grad():
        before, after = opt(*inputs), loaded(*inputs)
    (want, want_structure), (got, got_structure) = optic.ir.contract.flatten(before), optic.ir.contract.flatten(after)
    assert type(after) is type(before) and got_structure == want_structure  # a ModelOutput stays one
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True) if isinstance(a, torch.Tensor))
    assert [p.name for p in loaded.report.passes] == [p.name for p in rep.passes]
    return rep


@pytest.mark.parametrize("name", FAST)
def test_fast_zoo_models(name, tmp_path):
    if get(name).source == "hf":
        pytest.importorskip("transformers")
    _check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_slow_zoo_models(name, tmp_path):
    _check(name, tmp_path)


def test_shared_producer_bn_reason_is_reported(tmp_path):
    rep = _check("shared_producer", tmp_path)
    assert any("users" in d["reason"] for d in rep.declines("bn_into_conv_or_linear"))
