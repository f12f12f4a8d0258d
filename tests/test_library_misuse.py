"""Library misuse: a failed load or injection leaves the caller's model exactly as it was (so a retry works), and
a spent or emptied ``PeftModel`` refuses clearly instead of doing something half-way."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.layers import LoraLayer
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed load must not change: module types, state dict, requires_grad flags, modes."""
    return {
        "types": {name: type(module) for name, module in model.named_modules()},
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "grads": {name: p.requires_grad for name, p in model.named_parameters()},
        "modes": {name: module.training for name, module in model.named_modules()},
    }


def _assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["grads"] == before["grads"]
    assert after["modes"] == before["modes"]


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture
def saved_adapter(tmp_path):
    """A non-trivial rank-4 adapter, and a copy whose config claims rank 8 (its tensors do not fit)."""
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(tiny_llama(), config).save_pretrained(tmp_path / "good")
    bad = tmp_path / "bad"
    get_peft_model(tiny_llama(), config).save_pretrained(bad)
    config_file = bad / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 8}))
    return tmp_path / "good", bad


def test_failed_from_pretrained_leaves_the_model_as_it_was_and_a_retry_works(saved_adapter, input_ids):
    good, bad = saved_adapter
    model = tiny_llama().train()  # training mode and trainable weights must survive the failure too
    before = _snapshot(model)
    with pytest.raises(ValueError, match="Shape mismatch"):
        PeftModel.from_pretrained(model, bad)
    _assert_unchanged(model, before)

    loaded = PeftModel.from_pretrained(model, good)  # used to fail: "Adapter 'default' already exists"
    expected = PeftModel.from_pretrained(tiny_llama(), good)
    torch.testing.assert_close(_logits(loaded, input_ids), _logits(expected, input_ids), atol=0, rtol=0)


def test_failed_get_peft_model_leaves_no_lora_layer_behind():
    model = tiny_llama()
    before = _snapshot(model)
    config = LoraConfig(target_modules=TARGETS, modules_to_save=["no_such_head"])
    with pytest.raises(ValueError, match="modules_to_save entry 'no_such_head' matches no module"):
        get_peft_model(model, config)
    _assert_unchanged(model, before)
    get_peft_model(model, LoraConfig(target_modules=TARGETS))  # the same model takes an adapter afterwards


def test_failed_add_adapter_can_be_retried_under_the_same_name():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    names_before = {name for name, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="matches no module"):
        model.add_adapter("second", LoraConfig(target_modules=TARGETS, modules_to_save=["lm_hed"]))
    assert {name for name, _ in model.named_parameters()} == names_before
    assert list(model.peft_config) == ["default"]
    model.add_adapter("second", LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"]))
    assert set(model.peft_config) == {"default", "second"}


def test_modules_to_save_task_heads_stay_optional():
    # PEFT writes modules_to_save: [classifier, score] for sequence classification; a model has only one.
    from tests.conftest import tiny_bert_classifier

    config = LoraConfig(
        target_modules=["query"], task_type="SEQ_CLS", modules_to_save=["classifier", "score"]
    )
    model = get_peft_model(tiny_bert_classifier(), config)
    assert any("classifier.modules_to_save" in name for name, _ in model.named_parameters())


def test_after_merge_and_unload_set_adapter_and_save_refuse(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    for action in (
        lambda: model.set_adapter("default"),
        lambda: model.save_pretrained(tmp_path),
        lambda: model.merge_and_unload(),
    ):
        with pytest.raises(ValueError, match=r"merge_and_unload\(\) or unload\(\)"):
            action()
    assert not any(tmp_path.iterdir())


def test_saving_after_deleting_the_only_adapter_refuses(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter left to save"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
