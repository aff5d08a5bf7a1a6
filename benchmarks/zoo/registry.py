"""The zoo's table of models: name -> how to build it, how to feed it, how to capture it."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from . import hf_models as hf
from . import torch_models as tm
from .common import float_inputs, image_inputs, seeded, token_inputs


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    ``factory()`` builds the model in eval mode with fixed weights (seed 0, randomised norm
    statistics); ``inputs(batch)`` returns a deterministic tuple of positional arguments whose
    tensors all have ``batch`` as their first dimension.  ``capture`` is ``"fx"`` when
    ``torch.fx.symbolic_trace`` works on the model and ``"export"`` when only
    ``torch.export.export(..., strict=False)`` does.  ``slow`` marks models too heavy for the
    quick CPU test run.
    """

    name: str
    family: str  # "cnn" | "transformer"
    factory: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]
    capture: str  # "fx" | "export"
    source: str  # "torch" | "hf"
    has_bn: bool
    slow: bool = False


ENTRIES: dict[str, ZooEntry] = {}


def _add(name, family, build, inputs, *, capture, source, has_bn, slow=False) -> None:
    ENTRIES[name] = ZooEntry(name, family, seeded(build), inputs, capture, source, has_bn, slow)


def _torch(name, family, build, inputs, *, has_bn, slow=False) -> None:
    _add(name, family, build, inputs, capture="fx", source="torch", has_bn=has_bn, slow=slow)


def _hf(name, family, build, inputs, *, has_bn=False) -> None:
    _add(name, family, build, inputs, capture="export", source="hf", has_bn=has_bn, slow=True)


# Small models that exercise corner cases (fast enough for every test run).
_torch("tiny_cnn", "cnn", tm.tiny_cnn, image_inputs(3, 32, 32), has_bn=True)
_torch("tconv_bn", "cnn", tm.tconv_bn, image_inputs(3, 16, 16), has_bn=True)
_torch("conv1d_bn", "cnn", tm.conv1d_bn, image_inputs(4, 64), has_bn=True)
_torch("conv3d_bn", "cnn", tm.conv3d_bn, image_inputs(3, 8, 16, 16), has_bn=True)
_torch("shared_producer", "cnn", tm.shared_producer, image_inputs(3, 16, 16), has_bn=True)
_torch("tiny_transformer", "transformer", tm.tiny_transformer, float_inputs(16, 64), has_bn=False)

# Full-size architectures.
_torch("resnet18", "cnn", tm.resnet18, image_inputs(3, 224, 224), has_bn=True)
_torch("resnet50", "cnn", tm.resnet50, image_inputs(3, 224, 224), has_bn=True, slow=True)
_torch("mobilenetv2", "cnn", tm.mobilenetv2, image_inputs(3, 224, 224), has_bn=True)
_torch("convnext", "cnn", tm.convnext, image_inputs(3, 224, 224), has_bn=False)
_torch("vit_s16", "transformer", tm.vit_s16, image_inputs(3, 224, 224), has_bn=False, slow=True)
_torch(
    "bert_base",
    "transformer",
    tm.bert_base,
    token_inputs(30522, 128, with_mask=True),
    has_bn=False,
    slow=True,
)
_torch("gpt2", "transformer", tm.gpt2, token_inputs(50257, 64), has_bn=False, slow=True)

# Hugging Face transformers models (random weights from configs; need `transformers`).
_S = hf.SEQ_LEN
_IMG = image_inputs(3, hf.IMAGE_SIZE, hf.IMAGE_SIZE)
_hf("hf_bert", "transformer", hf.hf_bert, token_inputs(hf.BERT_VOCAB, _S, with_mask=True))
_hf("hf_bert_sdpa", "transformer", hf.hf_bert_sdpa, token_inputs(hf.BERT_VOCAB, _S, with_mask=True))
_hf("hf_gpt2", "transformer", hf.hf_gpt2, token_inputs(hf.GPT2_VOCAB, _S))
_hf("hf_gpt2_sdpa", "transformer", hf.hf_gpt2_sdpa, token_inputs(hf.GPT2_VOCAB, _S))
_hf("hf_llama", "transformer", hf.hf_llama, token_inputs(hf.LLAMA_VOCAB, _S))
_hf("hf_vit", "transformer", hf.hf_vit, _IMG)
_hf("hf_swin", "transformer", hf.hf_swin, image_inputs(3, hf.SWIN_IMAGE_SIZE, hf.SWIN_IMAGE_SIZE))
_hf("hf_convnext", "cnn", hf.hf_convnext, _IMG)
_hf("hf_resnet", "cnn", hf.hf_resnet, _IMG, has_bn=True)
_hf("hf_mobilenetv2", "cnn", hf.hf_mobilenetv2, _IMG, has_bn=True)


def names(source: str | None = None) -> list[str]:
    """Names of the usable entries, in registration order, optionally only those of ``source``.

    Hugging Face entries are listed only when ``transformers`` is importable.
    """
    if source is not None and source not in ("torch", "hf"):
        raise ValueError(f"unknown source {source!r}; expected 'torch', 'hf' or None")
    have_hf = hf.transformers_available()
    return [
        e.name
        for e in ENTRIES.values()
        if (source is None or e.source == source) and (e.source != "hf" or have_hf)
    ]


def get(name: str) -> ZooEntry:
    """The entry called ``name``; ``KeyError`` (with a suggestion) if there is none."""
    try:
        return ENTRIES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(ENTRIES), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"no zoo entry '{name}'. Known: {', '.join(ENTRIES)}.{hint}") from None
