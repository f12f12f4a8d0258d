"""AdaLoRA through lorakit's API: the layer formula, the regularizer, allocation entry points, reloading at the
pruned size, merging, config validation and the errors for what AdaLoRA cannot do."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adalora import AdaLoraConfig, AdaLoraModel, SVDLinear, adalora_config_for_run
from lorakit.config import load_adapter_config
from tests.adalora.helpers import LLAMA_KWARGS, logits, train
from tests.conftest import tiny_llama


def _model(**overrides):
    return lorakit.get_peft_model(tiny_llama(), AdaLoraConfig(**(LLAMA_KWARGS | overrides)))


def test_svd_linear_forward_is_base_plus_scaled_p_diag_e_q():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = SVDLinear(base)
    layer.update_layer("default", 3, lora_alpha=4.0, lora_dropout=0.0, init=False)
    A, E, B = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    x = torch.randn(2, 6)
    expected = base(x) + x @ (B @ torch.diag(E.view(-1)) @ A).T * 4.0 / (3 + 1e-5)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(
        layer.delta_weight("default"), B @ torch.diag(E.view(-1)) @ A * 4.0 / (3 + 1e-5)
    )


def test_starts_at_the_base_model(input_ids):
    model = _model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (layer.lora_E["default"] == 0).all()
    assert 0.015 < layer.lora_A["default"].std().item() < 0.025  # normal, std 0.02
    torch.testing.assert_close(logits(model, input_ids), logits(tiny_llama(), input_ids), atol=0, rtol=0)


def test_orthogonal_regularizer_is_added_to_the_loss(input_ids):
    model = _model(init_lora_weights=False, orth_reg_weight=0.3)
    with torch.no_grad():
        base_loss = model.get_base_model()(input_ids=input_ids, labels=input_ids).loss
        loss = model(input_ids=input_ids, labels=input_ids).loss
    penalties = []
    for module in model.modules():
        if isinstance(module, SVDLinear):
            A, B = module.lora_A["default"], module.lora_B["default"]
            penalties.append(torch.linalg.norm(A @ A.T - torch.eye(6)))  # Frobenius norm
            penalties.append(torch.linalg.norm(B.T @ B - torch.eye(6)))
    assert len(penalties) == 12
    torch.testing.assert_close(loss - base_loss, 0.3 * sum(penalties) / 12, atol=1e-5, rtol=1e-5)
    # the same term for training loops that compute their own loss from the logits
    with torch.no_grad():
        torch.testing.assert_close(model.regularization_loss(), loss - base_loss, atol=1e-5, rtol=1e-5)


def test_update_and_allocate_is_reachable_from_both_levels(input_ids):
    model = _model()
    assert isinstance(model.base_model, AdaLoraModel)
    assert model.update_and_allocate.__func__ is model.base_model.update_and_allocate.__func__
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    model.base_model.update_and_allocate(1)
    model.update_and_allocate(2)
    assert model.base_model.rank_allocator.sensitivity  # both calls updated the EMAs


def test_reload_at_pruned_size_and_merge(tmp_path, input_ids):
    model = _model()
    train(model, input_ids, 12)
    model.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for key, flags in pattern.items():
        layer = loaded.base_model.model.get_submodule(key.removesuffix(".lora_E"))
        assert layer.r["default"] == sum(flags) == layer.lora_E["default"].shape[0]
    expected = logits(model, input_ids)
    torch.testing.assert_close(logits(loaded, input_ids), expected, atol=1e-5, rtol=0)
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_E" in n) == 12
    merged = loaded.merge_and_unload()  # what `lorakit merge` does
    assert not any(isinstance(m, SVDLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="loaded for inference"):
        loaded.update_and_allocate(1)
    with torch.no_grad():  # a loss without a trainable adapter has no regularizer
        assert loaded(input_ids=input_ids, labels=input_ids).loss.item() == pytest.approx(
            merged(input_ids=input_ids, labels=input_ids).loss.item(), abs=1e-5
        )


def test_saving_again_after_reload_keeps_the_pruned_adapter(tmp_path, input_ids):
    model = _model()
    train(model, input_ids, 12)
    model.save_pretrained(tmp_path / "first")
    reloaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "first", is_trainable=True)
    reloaded.save_pretrained(tmp_path / "second")
    again = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "second")
    torch.testing.assert_close(logits(again, input_ids), logits(model, input_ids), atol=1e-5, rtol=0)
    # training on at the pruned size: the allocation stays as saved, and the result saves and reloads
    pattern = reloaded.peft_config["default"].rank_pattern
    losses, _ = train(reloaded, input_ids, 3)
    assert reloaded.peft_config["default"].rank_pattern == pattern
    reloaded.save_pretrained(tmp_path / "third")
    third = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "third")
    torch.testing.assert_close(logits(third, input_ids), logits(reloaded, input_ids), atol=1e-5, rtol=0)
    assert (logits(third, input_ids) - logits(again, input_ids)).abs().max() > 1e-4  # it did train


def test_disable_adapter_gives_the_base_model(input_ids):
    model = _model(init_lora_weights=False)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, input_ids), logits(tiny_llama(), input_ids))
    assert (logits(model, input_ids) - logits(tiny_llama(), input_ids)).abs().max() > 1e-3


def test_only_one_trainable_adapter():
    model = _model()
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("second", AdaLoraConfig(**LLAMA_KWARGS))
    model.add_adapter("frozen", AdaLoraConfig(**LLAMA_KWARGS, inference_mode=True))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen" in n)
    with pytest.raises(ValueError, match="same method"):
        model.add_adapter("lora", lorakit.LoraConfig(target_modules=["q_proj"]))


def test_mixed_adapter_batches_are_refused(input_ids):
    model = _model()
    with pytest.raises(ValueError, match="LoRA adapters only"):
        model(input_ids=input_ids, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="LoRA adapters only"):  # generate goes through mixed_batch directly
        model.generate(input_ids=input_ids, adapter_names=["default"] * len(input_ids), max_new_tokens=1)


@pytest.mark.parametrize(
    "targets, message",
    [(["embed_tokens", "q_proj"], "not embeddings"), (["self_attn"], "LlamaAttention")],
)
def test_unsupported_layer_types_are_refused(targets, message):
    with pytest.raises(TypeError, match=message):
        _model(target_modules=targets)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(total_step=None), "total_step"),
        (dict(target_r=16), "must not exceed init_r"),
        (dict(tinit=5, tfinal=7), "no budgeting"),
        (dict(beta1=1.0), "beta1"),
        (dict(orth_reg_weight=-1.0), "orth_reg_weight"),
        (dict(use_dora=True), "use_dora"),
        (dict(init_lora_weights="gaussian"), "init_lora_weights"),
        (dict(rank_pattern={"x.lora_E": [True, False]}), "init_r is 6"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        AdaLoraConfig(**(LLAMA_KWARGS | overrides))


def test_config_json_round_trip(tmp_path):
    config = AdaLoraConfig(**LLAMA_KWARGS, rank_pattern={"a.lora_E": [True] * 5 + [False]})
    config.save_pretrained(tmp_path)
    loaded = load_adapter_config(tmp_path)
    assert isinstance(loaded, AdaLoraConfig) and loaded.to_dict() == config.to_dict()


def test_config_for_run_defaults():
    config = adalora_config_for_run(total_step=1000, r=8, target_modules=["q_proj"])
    assert (config.init_r, config.target_r, config.tinit, config.tfinal, config.deltaT) == (
        12,
        8,
        100,
        300,
        10,
    )
    with pytest.raises(ValueError, match="at least 3"):
        adalora_config_for_run(total_step=2, r=8, target_modules=["q_proj"])


def test_trainer_method_builds_adalora():
    from lorakit.train.adapters import attach_adapter, build_adapter_config
    from lorakit.train.config import TrainConfig

    train_config = TrainConfig(method="adalora", lora_r=4, target_modules=["q_proj", "v_proj"])
    config = build_adapter_config(train_config, total_steps=50)
    assert isinstance(config, AdaLoraConfig)
    assert (config.total_step, config.target_r, config.init_r) == (50, 4, 6)
    model = attach_adapter(tiny_llama(), train_config, total_steps=50)
    assert isinstance(model.base_model, AdaLoraModel)


def test_works_over_a_4bit_base_and_merges_dequantized(input_ids):
    from lorakit.quant import quantize_model

    base = quantize_model(tiny_llama(), compute_dtype=torch.float32)
    config = AdaLoraConfig(**(LLAMA_KWARGS | dict(init_lora_weights=False)))
    model = lorakit.get_peft_model(base, config)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    expected = logits(model, input_ids)
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(logits(merged, input_ids), expected, atol=1e-5, rtol=0)
