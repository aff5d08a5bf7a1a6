"""The model zoo: entries build deterministically, take the documented inputs and capture as recorded."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from benchmarks.zoo import ENTRIES, ZooEntry, get, max_abs_diff, names, output_tensors, randomize_norms
from benchmarks.zoo.hf_models import transformers_available

SMALL_CNNS = ["tiny_cnn", "tconv_bn", "conv1d_bn", "conv3d_bn", "shared_producer"]
TORCH_NAMES = [
    *SMALL_CNNS,
    "tiny_transformer",
    "resnet18",
    "resnet50",
    "mobilenetv2",
    "convnext",
    "vit_s16",
    "bert_base",
    "gpt2",
]
HF_NAMES = [
    "hf_bert",
    "hf_bert_sdpa",
    "hf_gpt2",
    "hf_gpt2_sdpa",
    "hf_llama",
    "hf_vit",
    "hf_swin",
    "hf_convnext",
    "hf_resnet",
    "hf_mobilenetv2",
]
BIG = {"resnet50", "bert_base", "gpt2", "vit_s16"}

_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _params(pred=lambda e: True):
    return [
        pytest.param(name, id=name, marks=pytest.mark.slow if e.slow else ())
        for name, e in ENTRIES.items()
        if pred(e)
    ]


def _entry(name: str) -> ZooEntry:
    e = get(name)
    if e.source == "hf":
        pytest.importorskip("transformers")
    return e


def _batch(e: ZooEntry) -> int:
    """Batch 1 for the 224x224 / long-sequence models, 2 for the rest (keeps the run quick)."""
    return 1 if e.name in {"resnet18", "mobilenetv2", "convnext", *BIG} else 2


def _run(model: nn.Module, args: tuple):
    with torch.no_grad():
        return model(*args)


# --------------------------------------------------------------------------------------------
# the table itself
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_entry():
    assert set(TORCH_NAMES) <= set(names("torch"))
    assert set(TORCH_NAMES) | set(HF_NAMES) <= set(ENTRIES)
    assert all(get(n).source == "torch" for n in names("torch"))
    assert names() == [n for n in ENTRIES if n in set(names("torch")) | set(names("hf"))]
    if transformers_available():
        assert set(HF_NAMES) <= set(names("hf"))
        assert all(get(n).source == "hf" for n in names("hf"))
    else:
        assert names("hf") == []
        assert names() == names("torch")


def test_entry_fields_are_consistent():
    for name, e in ENTRIES.items():
        assert e.name == name
        assert e.family in ("cnn", "transformer")
        assert e.capture in ("fx", "export")
        assert e.source in ("torch", "hf")
        assert name.startswith("hf_") == (e.source == "hf")
        if e.source == "hf":
            assert e.capture == "export" and e.slow
        if name in BIG:
            assert e.slow


def test_get_unknown_name_suggests():
    with pytest.raises(KeyError, match="resnet18"):
        get("resnet81")
    with pytest.raises(ValueError):
        names("timm")


@pytest.mark.parametrize("name", _params())
def test_inputs_have_the_batch_size_and_are_deterministic(name):
    e = get(name)  # inputs need no transformers
    for batch in (1, 3):
        args = e.inputs(batch)
        assert isinstance(args, tuple) and args
        for a in args:
            assert isinstance(a, torch.Tensor) and a.shape[0] == batch
        again = e.inputs(batch)
        assert all(torch.equal(a, b) for a, b in zip(args, again, strict=True))


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params())
def test_factory_is_deterministic_and_in_eval_mode(name):
    e = _entry(name)
    m1, m2 = e.factory(), e.factory()
    assert not m1.training and not any(m.training for m in m1.modules())
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    args = e.inputs(_batch(e))
    y1, y2 = _run(m1, args), _run(m2, args)
    assert max_abs_diff(y1, y2) == 0.0
    outs = output_tensors(y1)
    assert outs and all(torch.isfinite(t).all() for t in outs)
    # outputs should be O(1)-ish, not vanishing (hf MobileNetV2's default init gives ~1e-25)
    assert max(t.abs().max().item() for t in outs) > 1e-2


def test_factory_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    get("tiny_cnn").factory()
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", _params())
def test_batchnorm_statistics_are_nontrivial(name):
    e = _entry(name)
    bns = [m for m in e.factory().modules() if isinstance(m, _BNS)]
    assert bool(bns) == e.has_bn
    for bn in bns:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


def test_randomize_norms_touches_layernorm_and_uses_generator():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LayerNorm(4))
    a = randomize_norms(model, torch.Generator().manual_seed(5))
    b = randomize_norms(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LayerNorm(4)),
        torch.Generator().manual_seed(5),
    )
    assert a is model
    for k in ("1.running_mean", "1.running_var", "1.weight", "1.bias", "2.weight", "2.bias"):
        assert torch.equal(a.state_dict()[k], b.state_dict()[k])
    assert not torch.equal(a[2].weight, torch.ones(4))


# --------------------------------------------------------------------------------------------
# capture paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _params(lambda e: e.capture == "fx"))
def test_fx_entries_trace_and_match_eager(name):
    e = _entry(name)
    model = e.factory()
    args = e.inputs(_batch(e))
    gm = torch.fx.symbolic_trace(model)
    assert max_abs_diff(_run(gm, args), _run(model, args)) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", _params(lambda e: e.capture == "export"))
def test_export_entries_export_and_match_eager(name):
    e = _entry(name)
    model = e.factory()
    args = e.inputs(2)
    ep = torch.export.export(model, args, strict=False)
    assert max_abs_diff(_run(ep.module(), args), _run(model, args)) <= 1e-5
    # "export" means symbolic_trace does not work; if it ever does, the entry should say "fx"
    with pytest.raises(Exception):  # noqa: B017 - any tracing failure will do
        torch.fx.symbolic_trace(model)


# --------------------------------------------------------------------------------------------
# the corner cases the small models are there for
# --------------------------------------------------------------------------------------------


def test_shared_producer_conv_output_has_two_users():
    gm = torch.fx.symbolic_trace(get("shared_producer").factory())
    conv = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "conv")
    users = {(u.op, u.target) for u in conv.users}
    assert ("call_module", "bn") in users
    assert ("call_function", operator.add) in users


def test_tconv_bn_has_grouped_transposed_conv_and_bn_variants():
    tconv = get("tconv_bn").factory().tconv
    assert (
        isinstance(tconv, nn.ConvTranspose2d)
        and tconv.groups == 2
        and tconv.in_channels != tconv.out_channels
    )
    kinds = {type(m) for n in ("conv1d_bn", "conv3d_bn") for m in get(n).factory().modules()}
    assert {nn.Conv1d, nn.BatchNorm1d, nn.Conv3d, nn.BatchNorm3d} <= kinds


@pytest.mark.slow
def test_gpt2_lm_head_is_tied_to_the_token_embedding():
    model = get("gpt2").factory()
    assert model.lm_head.weight is model.wte.weight
    gm = torch.fx.symbolic_trace(model)
    assert gm.lm_head.weight is gm.wte.weight


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, eager", [("hf_bert", True), ("hf_bert_sdpa", False), ("hf_gpt2", True), ("hf_gpt2_sdpa", False)]
)
def test_hf_attention_implementation(name, eager):
    e = _entry(name)
    model = e.factory()
    ep = torch.export.export(model, e.inputs(1), strict=False)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("softmax" in t for t in targets) == eager
    assert any("scaled_dot_product_attention" in t for t in targets) == (not eager)
