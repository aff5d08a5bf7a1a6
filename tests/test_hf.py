"""Hugging Face models stay Hugging Face models: default configs capture, the result keeps the model's class,
config and outputs, and generate() gives the original's tokens."""

from __future__ import annotations

import pytest
import torch

import optic
from optic.errors import InputMismatchError

transformers = pytest.importorskip("transformers")

EXACT_NO_TIMING = ["cleanup", "fold_norm", "fuse", "cleanup"]  # the exact passes without the CPU step's timing


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=128,
                                  bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg).eval()  # the default config: use_cache=True


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=500, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval()


def ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 500, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_a_causal_lm_keeps_its_class_outputs_and_generates_the_same_tokens(make):
    model = make()
    x = ids(1, 7)
    result = optic.optimize(model, (x,), passes=EXACT_NO_TIMING)
    assert isinstance(result, type(model)) and type(result) is not type(model)
    assert result.config.to_dict() == model.config.to_dict() and result.config is not model.config
    assert result.generation_config is not None and result.device == model.device and result.dtype == model.dtype
    with torch.no_grad():
        want, got = model(x), result(x)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    # the default config returns its KV cache: captured as a pytree, returned as the model's cache class
    assert type(got.past_key_values) is type(want.past_key_values)
    torch.testing.assert_close(got.past_key_values.layers[0].keys, want.past_key_values.layers[0].keys)
    gen = result.optic_generate.report
    assert "seq" in gen.dynamic and "batch" in gen.dynamic
    for prompt in (x, ids(2, 5, seed=3)):  # another batch and prompt length than the example's
        torch.testing.assert_close(result.generate(prompt, max_new_tokens=12, do_sample=False),
                                   model.generate(prompt, max_new_tokens=12, do_sample=False), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="without a KV cache"):
        result.generate(x, max_new_tokens=2, do_sample=False, use_cache=True)


def test_a_call_neither_graph_takes_names_both_reasons():
    result = optic.optimize(tiny_gpt2(), (ids(1, 7),), passes=EXACT_NO_TIMING)
    with pytest.raises(InputMismatchError, match="generation graph does not take this call either"):
        result(ids(1, 7), output_hidden_states=True)


def test_a_bert_encoder_gets_no_generation_graph():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  vocab_size=500, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    x = {"input_ids": ids(1, 32), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
    result = optic.optimize(model, x, passes=EXACT_NO_TIMING,
                            dynamic={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    assert isinstance(result, transformers.BertModel) and "optic_generate" not in result._modules
    y = {"input_ids": ids(3, 17, seed=1), "attention_mask": torch.ones(3, 17, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(result(**y).last_hidden_state, model(**y).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_a_capture_error_names_an_unregistered_output_type():
    class Box:
        def __init__(self, t):
            self.t = t

    class ReturnsBox(torch.nn.Module):
        def forward(self, x):
            return Box(x * 2)

    with pytest.raises(optic.CaptureError, match="returns a Box") as err:
        optic.optimize(ReturnsBox(), torch.randn(2, 3), capture="export")
    assert "control flow" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_default_passes_generate_the_same_tokens_and_save(make, tmp_path):
    model = make()
    result = optic.optimize(model, (ids(1, 7),))
    prompt = ids(1, 9, seed=5)
    want = model.generate(prompt, max_new_tokens=20, do_sample=False)
    torch.testing.assert_close(result.generate(prompt, max_new_tokens=20, do_sample=False), want, rtol=0, atol=0)
    loaded = optic.load(optic.save(result, tmp_path / "lm.pt"))
    assert isinstance(loaded, type(model))
    torch.testing.assert_close(loaded.generate(prompt, max_new_tokens=20, do_sample=False), want, rtol=0, atol=0)
