"""PEFT's public API beyond PeftModel, side by side with peft 0.21: get_peft_model's options, PeftConfig, the
state-dict functions, inject_adapter_in_model, lorakit.optimizers and the tuner-layer attributes."""

from __future__ import annotations

import inspect
import json

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer

import lorakit
from lorakit import AdaLoraConfig, LoraConfig, PeftConfig
from lorakit.layers import LoraLayer
from tests.conftest import tiny_llama

PEFT_NAMES = [
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "LoraConfig",
    "get_peft_model",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
]


def _logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_top_level_names_and_signatures_are_peft_s():
    for name in PEFT_NAMES:
        assert hasattr(lorakit, name) and name in lorakit.__all__, name
    for ours, theirs in [
        (lorakit.get_peft_model, peft.get_peft_model),
        (lorakit.PeftModel.set_adapter, peft.PeftModel.set_adapter),
        (lorakit.PeftModel.save_pretrained, peft.PeftModel.save_pretrained),
    ]:
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(theirs).parameters)
    from lorakit.optim import create_loraplus_optimizer as old_path  # noqa: F401 - the old path still works
    from lorakit.optimizers import create_loraplus_optimizer  # noqa: F401 - PEFT's path


# ---------------------------------------------------------------------------------------- get_peft_model
@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_autocast_adapter_dtype_matches_peft(autocast, dtype):
    kwargs = dict(target_modules=["q_proj", "embed_tokens"], use_dora=True)
    ours = lorakit.get_peft_model(
        tiny_llama().to(dtype), LoraConfig(**kwargs), autocast_adapter_dtype=autocast
    )
    theirs = peft.get_peft_model(
        tiny_llama().to(dtype), peft.LoraConfig(**kwargs), autocast_adapter_dtype=autocast
    )
    our_dtypes = {n: p.dtype for n, p in ours.named_parameters() if p.requires_grad}
    their_dtypes = {n: p.dtype for n, p in theirs.named_parameters() if p.requires_grad}
    assert our_dtypes == their_dtypes
    expected = torch.float32 if autocast and dtype != torch.float64 else dtype
    assert set(our_dtypes.values()) == {expected}


def test_autocast_false_also_applies_to_added_and_loaded_adapters(tmp_path):
    model = lorakit.get_peft_model(
        tiny_llama().to(torch.bfloat16), LoraConfig(target_modules=["q_proj"]), autocast_adapter_dtype=False
    )
    model.add_adapter("second", LoraConfig(target_modules=["v_proj"]), autocast_adapter_dtype=False)
    model.save_pretrained(tmp_path)
    model.load_adapter(tmp_path / "second", "third", autocast_adapter_dtype=False)
    dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}


def test_revision_is_recorded_in_the_config(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]), revision="v1.0")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["revision"] == "v1.0"
    assert peft.PeftConfig.from_pretrained(tmp_path).revision == "v1.0"


def test_mixed_gives_a_lora_only_mixed_model(input_ids):
    model = lorakit.get_peft_model(
        tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False), mixed=True
    )
    assert isinstance(model, lorakit.PeftMixedModel) and isinstance(model, lorakit.PeftModel)
    model.add_adapter("other", LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    model.set_adapter(["default", "other"])
    assert model.active_adapters == ["default", "other"]
    with pytest.raises(NotImplementedError, match="PeftMixedModel.*LoRA adapters only.*without mixed=True"):
        model.add_adapter("ada", AdaLoraConfig(target_modules=["k_proj"], total_step=10))
    model.delete_adapter(["other"])
    assert list(model.peft_config) == ["default"]
    with pytest.raises(NotImplementedError, match="AdaLoraConfig"):
        lorakit.get_peft_model(
            tiny_llama(), AdaLoraConfig(target_modules=["q_proj"], total_step=10), mixed=True
        )


# ------------------------------------------------------------------------------------------- PeftConfig
def test_peft_config_is_the_base_class_and_reads_any_adapter_folder(tmp_path):
    assert isinstance(LoraConfig(target_modules=["q_proj"]), PeftConfig)
    assert isinstance(AdaLoraConfig(target_modules=["q_proj"], total_step=10), PeftConfig)
    assert isinstance(lorakit.AdapterConfig(), PeftConfig)
    lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4)).save_pretrained(
        tmp_path / "l"
    )
    peft.get_peft_model(
        tiny_llama(), peft.AdaLoraConfig(target_modules=["q_proj"], total_step=10)
    ).save_pretrained(tmp_path / "a")
    loaded = PeftConfig.from_pretrained(tmp_path / "l")
    assert type(loaded) is LoraConfig and loaded.r == 4
    assert type(PeftConfig.from_pretrained(tmp_path / "a")) is AdaLoraConfig
    assert type(PeftConfig.from_pretrained(tmp_path, subfolder="a")) is AdaLoraConfig
    with pytest.raises(ValueError, match="type 'ADALORA', not 'LORA'"):
        LoraConfig.from_pretrained(tmp_path / "a")


def test_from_json_file_returns_the_dict_as_peft_does(tmp_path):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text()) | {"runtime_config": {"ephemeral_gpu_offload": False}}
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="runtime_config"):
        ours = PeftConfig.from_json_file(path)
    with pytest.warns(UserWarning, match="runtime_config"):
        theirs = peft.PeftConfig.from_json_file(str(path))
    assert isinstance(ours, dict) and ours == theirs and "runtime_config" not in ours


# ---------------------------------------------------------------------------------- state-dict functions
CONFIG = dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], use_dora=True)


def _twins(tmp_path, **extra):
    """A PEFT model with a trained-looking adapter, and lorakit's model loaded from its files."""
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **CONFIG, **extra))
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    return theirs, ours


def test_get_peft_model_state_dict_equals_peft_s(tmp_path):
    theirs, ours = _twins(tmp_path)
    our_state = lorakit.get_peft_model_state_dict(ours)
    their_state = peft.get_peft_model_state_dict(theirs)
    assert our_state.keys() == their_state.keys()
    assert all(torch.equal(our_state[k], their_state[k]) for k in our_state)
    assert all(k.startswith("base_model.model.") and ".default." not in k for k in our_state)


def test_set_peft_model_state_dict_reports_keys_as_peft_does(tmp_path):
    theirs, _ = _twins(tmp_path)
    state = dict(peft.get_peft_model_state_dict(theirs))
    state.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    state["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = torch.zeros(8, 32)
    fresh_theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**CONFIG))
    fresh_ours = lorakit.get_peft_model(tiny_llama(), LoraConfig(**CONFIG))
    their_result = peft.set_peft_model_state_dict(fresh_theirs, state)
    our_result = lorakit.set_peft_model_state_dict(fresh_ours, state)
    assert sorted(our_result.missing_keys) == sorted(their_result.missing_keys)
    assert sorted(our_result.unexpected_keys) == sorted(their_result.unexpected_keys)
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight" in our_result.missing_keys
    loaded = lorakit.get_peft_model_state_dict(fresh_ours)
    for key, value in state.items():
        if key in loaded:
            assert torch.equal(loaded[key], value), key


def test_set_peft_model_state_dict_shape_mismatch(tmp_path):
    theirs, _ = _twins(tmp_path)
    state = dict(peft.get_peft_model_state_dict(theirs))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(8, 48)
    ours = lorakit.get_peft_model(tiny_llama(), LoraConfig(**CONFIG))
    with pytest.raises(RuntimeError, match="size mismatch"):
        lorakit.set_peft_model_state_dict(ours, state)
    with pytest.warns(UserWarning, match="ignore_mismatched_sizes"):
        result = lorakit.set_peft_model_state_dict(ours, state, ignore_mismatched_sizes=True)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in result.missing_keys


def test_get_base_model_state_dict_equals_peft_s_and_the_original(tmp_path):
    theirs, ours = _twins(tmp_path)
    original = tiny_llama().state_dict()
    our_base, their_base = lorakit.get_base_model_state_dict(ours), peft.get_base_model_state_dict(theirs)
    assert our_base.keys() == their_base.keys() == original.keys()
    assert all(torch.equal(our_base[k], original[k]) for k in original)
    changed = {k: v + 1 for k, v in original.items()}
    result = lorakit.set_base_model_state_dict(ours, changed)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(
        ours.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
        changed["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(ours.get_base_model().lm_head.original_module.weight, changed["lm_head.weight"])
    with pytest.raises(RuntimeError, match="(?s)Missing key.*Unexpected key.*'extra'"):
        lorakit.set_base_model_state_dict(ours, {"extra": torch.zeros(1)})
    relaxed = lorakit.set_base_model_state_dict(ours, {"extra": torch.zeros(1)}, strict=False)
    assert relaxed.unexpected_keys == ["extra"] and len(relaxed.missing_keys) == len(original)


def test_inject_adapter_in_model_matches_peft(input_ids, tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), tiny_llama())
    ours = lorakit.inject_adapter_in_model(LoraConfig(**kwargs), tiny_llama())
    assert type(ours).__name__ == "LlamaForCausalLM"  # not wrapped
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    their_state = peft.get_peft_model_state_dict(theirs)
    assert set(lorakit.get_peft_model_state_dict(ours)) == set(their_state)  # no base_model.model. prefix
    result = lorakit.set_peft_model_state_dict(ours, their_state)
    assert result.unexpected_keys == []
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs, input_ids), atol=1e-6, rtol=0)
    # the file layout (with PEFT's prefix) loads too, and a second adapter can be injected
    prefixed = {f"base_model.model.{k}": v for k, v in their_state.items()}
    assert lorakit.set_peft_model_state_dict(ours, prefixed).unexpected_keys == []
    lorakit.inject_adapter_in_model(LoraConfig(target_modules=["k_proj"]), ours, adapter_name="second")
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["k_proj"]), theirs, adapter_name="second")
    assert set(ours.peft_config) == {"default", "second"}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        lorakit.inject_adapter_in_model(LoraConfig(target_modules=["k_proj"]), ours, adapter_name="second")


# ------------------------------------------------------------------------------------ optimizers, layers
def test_optimizers_module_takes_peft_s_arguments():
    from lorakit.optimizers import create_loraplus_optimizer

    targets = ["q_proj", "v_proj", "embed_tokens"]
    ours = lorakit.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=targets))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=targets))
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-5, loraplus_weight_decay=0.1)

    def groups(model, optimizer):
        of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
        return {n: of[id(p)] for n, p in model.named_parameters() if p.requires_grad}

    ours_groups = groups(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs))
    theirs_groups = groups(theirs, peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, **kwargs))
    assert ours_groups == theirs_groups
    with pytest.raises(TypeError):
        create_loraplus_optimizer(ours, torch.optim.AdamW, 1e-3, 16.0)  # keyword-only, as PEFT's


def test_layers_have_peft_s_adapter_attribute_names():
    ours = lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj", "embed_tokens"]))
    layers = [m for m in ours.modules() if isinstance(m, LoraLayer)]
    their_layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for layer, their_layer in zip(layers, their_layers):
        assert set(layer.adapter_layer_names) <= set(their_layer.adapter_layer_names)
        assert set(layer.other_param_names) <= set(their_layer.other_param_names)
        assert layer.active_adapters == their_layer.active_adapters == ["default"]
        for name in layer.adapter_layer_names + layer.other_param_names:
            assert hasattr(getattr(layer, name), "keys"), name  # each is a container keyed by adapter name
        assert "default" in layer.lora_dropout and "default" in layer.r
    assert layers[0].adapter_layer_names == ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    assert layers[1].adapter_layer_names == ("lora_A", "lora_B", "lora_magnitude_vector")
