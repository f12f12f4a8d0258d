"""quantize_model on tiny transformers models: what is replaced, outputs, memory, tied weights, round trips."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lorakit.quant import (
    Linear4bit,
    dequantize_model,
    nf4_storage_bytes,
    quantize_model,
    quantized_layers,
    resolve_compute_dtype,
)
from tests.conftest import LLAMA_PROJECTIONS, tiny_gpt2, tiny_llama


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_linear_layers_are_replaced_and_the_rest_kept(input_ids):
    model = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    layers = quantized_layers(model)
    group = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    expected = {
        f"model.layers.{i}.{group.get(proj, 'mlp')}.{proj}" for i in range(2) for proj in LLAMA_PROJECTIONS
    }
    assert set(layers) == expected
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.model.norm.weight.dtype == torch.float32
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")  # transformers' properties
    assert model.lorakit_quantization["compute_dtype"] == "float32"
    assert not any(p.requires_grad for layer in layers.values() for p in layer.parameters())


def test_logits_close_to_the_fp32_model(input_ids):
    """2 layers of N(0, 0.02^2) weights, each with ~9% relative NF4 weight error: logits within ~6% (stated: 10%)."""
    reference = tiny_llama()
    quantized = quantize_model(copy.deepcopy(reference), compute_dtype=torch.float32)
    expected, actual = _logits(reference, input_ids), _logits(quantized, input_ids)
    relative = ((actual - expected).norm() / expected.norm()).item()
    assert 0.01 < relative < 0.10


def test_bf16_compute_model_runs_and_generates(input_ids):
    model = quantize_model(tiny_llama(), compute_dtype="bf16")
    assert next(iter(quantized_layers(model).values())).compute_dtype == torch.bfloat16
    assert _logits(model, input_ids).dtype == torch.float32  # outputs follow the fp32 activations
    generated = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, input_ids.shape[1] + 4)


def test_measured_bits_per_weight():
    """Bytes of every buffer of the quantized layers / their weights: exactly the formula, ~4.127 bits for big layers."""
    model = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 1024), nn.Linear(100, 688))
    quantize_model(model, compute_dtype=torch.float32)
    layers = quantized_layers(model).values()
    stored = sum(buffer.numel() * buffer.element_size() for layer in layers for buffer in layer.buffers())
    weights = sum(layer.in_features * layer.out_features for layer in layers)
    assert stored == sum(nf4_storage_bytes(layer.in_features * layer.out_features) for layer in layers)
    bits = 8 * stored / weights
    assert 4.12695 < bits < 4.1275  # 4.126953 payload + 68 bytes per layer
    fp32_bits = 32
    assert fp32_bits / bits > 7.7  # the base weights shrink 7.75x against fp32 (3.9x against bf16)


def test_skip_modules_match_dotted_names():
    model = quantize_model(tiny_llama(), skip_modules=["lm_head", "mlp", "layers.0.self_attn.q_proj"])
    names = set(quantized_layers(model))
    assert not any(".mlp." in name for name in names)
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names
    assert len(names) == 7


def test_tied_output_head_is_not_quantized(caplog):
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with caplog.at_level(logging.WARNING, logger="lorakit.quant.replace"):
        quantize_model(model, skip_modules=())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in caplog.text and "tied" in caplog.text


def test_gpt2_conv1d_layers_are_quantized_transposed(input_ids):
    reference = tiny_gpt2()
    model = quantize_model(copy.deepcopy(reference), compute_dtype=torch.float32)
    attention = model.transformer.h[0].attn.c_attn
    assert isinstance(attention, Linear4bit) and (attention.in_features, attention.out_features) == (32, 96)
    original = reference.transformer.h[0].attn.c_attn.weight  # (in, out)
    assert ((attention.dequantize() - original.T).norm() / original.norm()) < 0.12
    expected, actual = _logits(reference, input_ids), _logits(model, input_ids)
    assert ((actual - expected).norm() / expected.norm()) < 0.10


def test_whole_model_state_dict_round_trips_through_safetensors(tmp_path, input_ids):
    source = quantize_model(tiny_llama(seed=0), compute_dtype=torch.float32)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = quantize_model(tiny_llama(seed=5), compute_dtype=torch.float32)
    assert not torch.equal(_logits(target, input_ids), _logits(source, input_ids))
    target.load_state_dict(load_file(str(path)))
    torch.testing.assert_close(_logits(target, input_ids), _logits(source, input_ids), rtol=0, atol=0)


def test_dequantize_model_gives_plain_linears_with_the_same_function(input_ids):
    model = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    expected = _logits(model, input_ids)
    dequantize_model(model)
    assert not quantized_layers(model) and type(model.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(_logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    assert not hasattr(model, "lorakit_quantization")


def test_quantizing_twice_is_a_no_op_and_lora_models_are_refused():
    model = quantize_model(tiny_llama())
    layers = quantized_layers(model)
    quantize_model(model)
    assert all(quantized_layers(model)[name] is layer for name, layer in layers.items())

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_layer = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="quantize the base model first"):
        quantize_model(nn.Sequential(Wrapped()))


def test_multihead_attention_out_proj_is_left_alone():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    quantize_model(model)
    assert not quantized_layers(model)


def test_compute_dtype_names():
    assert (
        resolve_compute_dtype("bfloat16") is torch.bfloat16 and resolve_compute_dtype("fp32") is torch.float32
    )
    assert resolve_compute_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="Unknown compute dtype 'int8'"):
        resolve_compute_dtype("int8")
