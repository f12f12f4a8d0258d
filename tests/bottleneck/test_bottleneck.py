"""The bottleneck Adapter (Houlsby et al. 2019): formula, zero start, training, its own file format, Houlsby's
default placement, and the clear refusal to merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.bottleneck import (
    AdapterConfig,
    AdapterMergeError,
    BottleneckConfig,
    BottleneckLayer,
    BottleneckModel,
)
from lorakit.config import load_adapter_config
from tests.conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama

TARGETS = ["o_proj", "down_proj"]


def _logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _model(**overrides):
    settings = dict(task_type="CAUSAL_LM", target_modules=TARGETS, bottleneck_size=4)
    return lorakit.get_peft_model(tiny_llama(), AdapterConfig(**(settings | overrides)))


def _train(model, input_ids, steps=5, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize(
    "non_linearity, act", [("relu", torch.relu), ("tanh", torch.tanh), ("silu", nn.functional.silu)]
)
def test_layer_formula(non_linearity, act):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = BottleneckLayer(base)
    layer.update_layer("default", 3, non_linearity, 0.0, "random")
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    x = torch.randn(2, 6)
    h = base(x)
    expected = h + act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(x), expected)


def test_starts_at_the_base_model_and_counts_parameters(input_ids):
    model = _model()
    torch.testing.assert_close(_logits(model, input_ids), _logits(tiny_llama(), input_ids), atol=0, rtol=0)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    assert (layer.adapter_up["default"].weight == 0).all() and (
        layer.adapter_down["default"].weight != 0
    ).any()
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 4 * (2 * 32 * 4 + 32 + 4)  # 4 adapters of W_down, W_up and their biases
    assert {n.split(".")[-3] for n, p in model.named_parameters() if p.requires_grad} == {
        "adapter_down",
        "adapter_up",
    }


def test_houlsby_init_is_near_identity():
    model = _model(init="houlsby")
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and ".adapter_" in n]
    assert all(p.abs().max() <= 0.02 for p in weights) and all(p.abs().max() > 0 for p in weights)


def test_trains_saves_and_loads_in_its_own_format(tmp_path, input_ids):
    model = _model()
    losses = _train(model, input_ids)
    assert losses[-1] < losses[0] - 0.05
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK_ADAPTER" and config["bottleneck_size"] == 4
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.o_proj.adapter_down.weight" in keys
    assert len(keys) == 4 * 4 and not any("default" in k or "base_layer" in k for k in keys)
    assert isinstance(load_adapter_config(tmp_path), AdapterConfig)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded, input_ids), _logits(model, input_ids), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert (_logits(loaded, input_ids) - _logits(tiny_llama(), input_ids)).abs().max() > 1e-3


def test_public_names_stay_and_the_alias_is_the_same_class():
    assert BottleneckConfig is AdapterConfig is lorakit.AdapterConfig
    assert AdapterConfig.__name__ == "AdapterConfig" and AdapterConfig().peft_type == "BOTTLENECK_ADAPTER"


def test_peft_cannot_read_it_and_lorakit_says_which_method(tmp_path):
    _model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BOTTLENECK_ADAPTER"):
        lorakit.LoraConfig.from_pretrained(tmp_path)


def test_merge_is_refused_with_a_clear_error(input_ids):
    model = _model()
    for call in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(AdapterMergeError, match="cannot be merged"):
            call()
    assert issubclass(AdapterMergeError, ValueError)  # the CLI reports ValueErrors as user errors


def test_unload_and_disable_give_the_base_model(input_ids):
    model = _model(init="random")
    base_logits = _logits(tiny_llama(), input_ids)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, input_ids), base_logits)
    assert (_logits(model, input_ids) - base_logits).abs().max() > 1e-3
    plain = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, input_ids), base_logits)


def test_two_adapters_add_up(input_ids):
    model = _model(init="random")
    model.add_adapter("other", AdapterConfig(target_modules=TARGETS, bottleneck_size=2, init="random"))
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    x = torch.randn(1, 3, 32)
    h = layer.base_layer(x)
    model.set_adapter(["default", "other"])
    expected = h + layer.adapter_update("default", h) + layer.adapter_update("other", h)
    torch.testing.assert_close(layer(x), expected)
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"default", "other"}
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and "other" not in layer.adapter_down


@pytest.mark.parametrize(
    "builder, prefix, after_attention, after_ffn",
    [
        (tiny_llama, "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        (tiny_gpt2, "transformer.h", "attn.c_proj", "mlp.c_proj"),
        (tiny_bert_classifier, "bert.encoder.layer", "attention.output.dense", "output.dense"),
    ],
)
def test_default_placement_is_houlsbys(builder, prefix, after_attention, after_ffn):
    """No target_modules: one adapter after each attention output and one after each feed-forward block."""
    model = lorakit.get_peft_model(builder(), AdapterConfig(bottleneck_size=4))
    names = [n for n, _ in model.base_model.adapter_layers()]
    expected = [f"{prefix}.{i}.{part}" for i in range(2) for part in (after_attention, after_ffn)]
    assert sorted(names) == sorted(expected)


def test_mixed_adapter_batches_are_refused(input_ids):
    with pytest.raises(ValueError, match="LoRA adapters only"):
        _model()(input_ids=input_ids, adapter_names=["default", "default"])


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(bottleneck_size=0), ValueError, "bottleneck_size"),
        (dict(non_linearity="swish2"), ValueError, "non_linearity"),
        (dict(init="xavier"), ValueError, "init"),
        (dict(bias="lora_only"), ValueError, "bias"),
        (dict(target_modules=["o_prj"]), ValueError, "matches no module"),
        (dict(target_modules=["self_attn"]), TypeError, "output projection"),
    ],
)
def test_bad_configs_are_refused(overrides, error, message):
    with pytest.raises(error, match=message):
        _model(**overrides)


def test_unknown_architecture_needs_target_modules():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no default Adapter placement"):
        lorakit.get_peft_model(Tiny(), AdapterConfig(bottleneck_size=2))


def test_trainer_method_builds_an_adapter():
    from lorakit.train.adapters import attach_adapter, build_adapter_config
    from lorakit.train.config import TrainConfig

    train_config = TrainConfig(method="adapter", lora_r=8)
    config = build_adapter_config(train_config, total_steps=10)
    assert isinstance(config, AdapterConfig) and config.bottleneck_size == 8 and config.target_modules is None
    model = attach_adapter(tiny_llama(), train_config, total_steps=10)
    assert isinstance(model.base_model, BottleneckModel)
    assert len(list(model.base_model.adapter_layers())) == 4


def test_follows_a_4bit_layer(input_ids):
    from lorakit.quant import quantize_model

    model = lorakit.get_peft_model(
        quantize_model(tiny_llama(), compute_dtype=torch.float32), AdapterConfig(bottleneck_size=4)
    )
    losses = _train(model, input_ids, steps=3)
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".adapter_" in n)
