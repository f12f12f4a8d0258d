"""Adapter files: PEFT's key names, strict loading, and clear errors for every broken file."""

from __future__ import annotations

import datetime

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.serialization import WEIGHTS_NAME
from tests.conftest import tiny_llama


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(
        tiny_llama(), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path)
    return tmp_path


def test_keys_are_peft_names_without_adapter_name(saved):
    keys = sorted(load_file(saved / WEIGHTS_NAME))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert len(keys) == 2 * 2 * 2 and not any(".default." in k for k in keys)


def test_shape_mismatch_names_the_key_and_both_shapes(saved):
    bigger = tiny_llama(hidden_size=48)
    with pytest.raises(
        ValueError, match=r"Shape mismatch for 'base_model.*lora_A.weight'.*\(8, 32\).*\(8, 48\)"
    ):
        PeftModel.from_pretrained(bigger, saved)


def test_unexpected_key_is_named(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    tensors["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(8, 32)
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="mlp.gate_proj.lora_A.weight.*matches no adapted module"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_missing_key_is_named(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="lacks 1 tensor.*layers.1.self_attn.v_proj.lora_B.weight"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_truncated_file_is_reported_as_corrupt(saved):
    path = saved / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_missing_weights_file(saved):
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="No adapter_model.safetensors"):
        PeftModel.from_pretrained(tiny_llama(), saved)


def test_missing_folder():
    with pytest.raises(FileNotFoundError):
        PeftModel.from_pretrained(tiny_llama(), "/nonexistent/adapter/folder")


def test_pickle_is_refused_unless_allowed_and_then_weights_only(saved):
    tensors = load_file(saved / WEIGHTS_NAME)
    (saved / WEIGHTS_NAME).unlink()
    torch.save(tensors, saved / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        PeftModel.from_pretrained(tiny_llama(), saved)
    loaded = PeftModel.from_pretrained(tiny_llama(), saved, allow_pickle=True)
    layer = loaded.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(
        layer.lora_A["default"].weight,
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
    )


def test_pickle_with_code_is_refused_even_when_allowed(saved):
    (saved / WEIGHTS_NAME).unlink()
    torch.save({"x": datetime.datetime(2026, 1, 1)}, saved / "adapter_model.bin")  # not a plain tensor type
    with pytest.raises(ValueError, match="could not be read as plain tensors"):
        PeftModel.from_pretrained(tiny_llama(), saved, allow_pickle=True)


def test_save_is_atomic_and_leaves_no_temp_files(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS_NAME]
