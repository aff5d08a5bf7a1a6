"""Hugging Face ``transformers`` models for the zoo, built from config classes with random weights.

Nothing is downloaded: every model comes from a config object.  ``transformers`` is an
optional dependency, so it is imported inside the builders only.  Sizes are small but keep
each architecture's structure (e.g. shifted windows in Swin, grouped-query attention and RoPE
in Llama) so that CPU tests stay fast.  None of these trace with ``torch.fx.symbolic_trace``;
they are captured with ``torch.export.export(..., strict=False)``.
"""

from __future__ import annotations

import importlib.util

from torch import nn

IMAGE_SIZE = 64
SWIN_IMAGE_SIZE = 128
SEQ_LEN = 32
BERT_VOCAB = 30522
GPT2_VOCAB = 50257
LLAMA_VOCAB = 32000


def transformers_available() -> bool:
    """Whether ``transformers`` is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules["transformers"] = None
        return False


def _bert(attn_implementation: str | None) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=512,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return BertModel(config)


def hf_bert() -> nn.Module:
    """BertModel, eager attention (explicit matmul/softmax in the graph)."""
    return _bert("eager")


def hf_bert_sdpa() -> nn.Module:
    """BertModel with the default attention (scaled_dot_product_attention)."""
    return _bert(None)


def _gpt2(attn_implementation: str | None) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=GPT2_VOCAB,
        n_positions=256,
        n_embd=128,
        n_layer=2,
        n_head=4,
        use_cache=False,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return GPT2LMHeadModel(config)


def hf_gpt2() -> nn.Module:
    """GPT2LMHeadModel (tied lm head), eager attention, no KV cache."""
    return _gpt2("eager")


def hf_gpt2_sdpa() -> nn.Module:
    """GPT2LMHeadModel with the default attention (scaled_dot_product_attention), no KV cache."""
    return _gpt2(None)


def hf_llama() -> nn.Module:
    """LlamaForCausalLM: RMSNorm, RoPE, SwiGLU, grouped-query attention (4 q / 2 kv heads), eager."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=LLAMA_VOCAB,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_cache=False,
    )
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config)


def hf_vit() -> nn.Module:
    """ViTForImageClassification on 64x64 images with 16x16 patches (16 patches + cls)."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=16,
        hidden_size=192,
        num_hidden_layers=4,
        num_attention_heads=3,
        intermediate_size=768,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def hf_swin() -> nn.Module:
    """SwinModel on 128x128 images: patch 4, window 4, shifted windows in every second block.

    Stage resolutions are 32, 16, 8, 4: the last stage equals the window, as in Swin-T at 224.
    (transformers 5.24 breaks when a stage is *smaller* than the window: the relative position
    bias keeps the configured window size while the window shrinks, so 64x64 inputs fail.)
    """
    from transformers import SwinConfig, SwinModel

    config = SwinConfig(
        image_size=SWIN_IMAGE_SIZE,
        patch_size=4,
        embed_dim=32,
        depths=[2, 2, 2, 2],
        num_heads=[1, 2, 4, 8],
        window_size=4,
        drop_path_rate=0.0,
    )
    return SwinModel(config)


def hf_convnext() -> nn.Module:
    """ConvNextModel with small widths; layer scale 0.1 so blocks are far from the identity."""
    from transformers import ConvNextConfig, ConvNextModel

    config = ConvNextConfig(
        hidden_sizes=[32, 64, 128, 256],
        depths=[2, 2, 2, 2],
        layer_scale_init_value=0.1,
        image_size=IMAGE_SIZE,
    )
    return ConvNextModel(config)


def hf_resnet() -> nn.Module:
    """ResNetModel with one bottleneck block per stage."""
    from transformers import ResNetConfig, ResNetModel

    config = ResNetConfig(
        embedding_size=32,
        hidden_sizes=[64, 128, 256, 512],
        depths=[1, 1, 2, 1],
        layer_type="bottleneck",
    )
    return ResNetModel(config)


def hf_mobilenetv2() -> nn.Module:
    """MobileNetV2Model (TF-style padding), width 0.5.

    The library's default init leaves the outputs near 1e-25; the convs are re-initialised
    (kaiming normal, fan_out) so that activations stay O(1).  BN statistics are randomised by
    the registry's factory wrapper.
    """
    from transformers import MobileNetV2Config, MobileNetV2Model

    config = MobileNetV2Config(image_size=IMAGE_SIZE, depth_multiplier=0.5)
    model = MobileNetV2Model(config)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
