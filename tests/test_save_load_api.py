"""PeftModel's adapter life cycle side by side with peft 0.21: loading (eval mode, load results, resuming into an
existing adapter), merging twice, disable_adapter, set_adapter, the model card, saving from a given state dict,
and the errors after merge_and_unload or deleting the last adapter."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from tests.conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _saved_by_peft(tmp_path, **kwargs):
    torch.manual_seed(0)
    config = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **kwargs)
    theirs = peft.get_peft_model(tiny_llama(), config)
    theirs.save_pretrained(tmp_path)
    return theirs


# ------------------------------------------------------------------------------------------------ loading
def test_from_pretrained_is_in_eval_mode_so_dropout_is_off(input_ids, tmp_path):
    _saved_by_peft(tmp_path, lora_dropout=0.1)
    ours = PeftModel.from_pretrained(tiny_llama().train(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().train(), tmp_path)
    assert not ours.training and not any(m.training for m in ours.modules())
    first = _logits(ours, input_ids)
    torch.testing.assert_close(_logits(ours, input_ids), first, atol=0, rtol=0)
    torch.testing.assert_close(first, _logits(theirs, input_ids), atol=1e-5, rtol=0)
    trainable = PeftModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    assert trainable.training  # left as passed, as PEFT does
    assert peft.PeftModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True).training


def test_load_adapter_returns_the_load_result_and_trains_only_when_asked(tmp_path):
    _saved_by_peft(tmp_path)
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=TARGETS))
    for model in (ours, theirs):
        result = model.load_adapter(tmp_path, "frozen")
        assert result.missing_keys == [] and result.unexpected_keys == []
        model.train()
        model.load_adapter(tmp_path, "trained", is_trainable=True)
        assert model.training  # is_trainable: the mode is left alone
    assert _trainable(ours) == _trainable(theirs)
    assert any(".trained." in n for n in _trainable(ours)) and not any(
        ".frozen." in n for n in _trainable(ours)
    )
    ours.load_adapter(tmp_path, "again")
    assert not ours.training


def test_load_adapter_into_an_existing_adapter_replaces_its_weights(input_ids, tmp_path):
    """How transformers' Trainer resumes: load_adapter(checkpoint, active_adapter, is_trainable=True)."""
    theirs = _saved_by_peft(tmp_path)
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    before = _trainable(ours)
    ours.train()
    result = ours.load_adapter(tmp_path, "default", is_trainable=True)
    assert result.missing_keys == [] and list(ours.peft_config) == ["default"]
    assert _trainable(ours) == before and ours.training
    ours.eval()
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs.eval(), input_ids), atol=1e-5, rtol=0)


def test_strict_loading_still_names_a_missing_key(tmp_path):
    """Where PEFT would list a missing key in the load result, lorakit refuses to load, naming it."""
    from safetensors.torch import save_file

    _saved_by_peft(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="lacks 1 tensor.*layers.0.self_attn.v_proj.lora_B"):
        ours.load_adapter(tmp_path, "broken")
    assert list(ours.peft_config) == ["default"]  # rolled back


# ----------------------------------------------------------------------------------------------- merging
def _both_models(**kwargs):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False)
    )
    ours = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, **kwargs))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _messages(action):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return {str(w.message) for w in caught if issubclass(w.category, UserWarning)}


def test_merging_a_merged_adapter_warns_as_peft_and_does_not_add_it_twice(input_ids):
    theirs, ours = _both_models()
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    ours.add_adapter("other", LoraConfig(target_modules=["v_proj"]))
    ours.load_state_dict(theirs.state_dict())
    unmerged = _logits(ours, input_ids)
    for model in (theirs, ours):
        model.merge_adapter()
    assert (
        _messages(ours.merge_adapter)
        == _messages(theirs.merge_adapter)
        == {"All adapters are already merged, nothing to do."}
    )
    torch.testing.assert_close(_logits(ours, input_ids), unmerged, atol=1e-5, rtol=0)
    expected = {"Already following adapters were merged default. You are now additionally merging other."}
    assert _messages(lambda: ours.merge_adapter(["default", "other"])) == expected
    assert _messages(lambda: theirs.merge_adapter(["default", "other"])) == expected
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs, input_ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- disable_adapter
def test_disable_adapter_behaves_as_peft_s(input_ids):
    torch.manual_seed(0)
    config = dict(target_modules=TARGETS, init_lora_weights=False, modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    ours = get_peft_model(tiny_llama(), LoraConfig(**config))
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # a trained head, so that falling back to the original head shows
        for model in (ours, theirs):
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)
    base, adapted = _logits(tiny_llama(), input_ids), _logits(ours, input_ids)
    trainable = _trainable(ours)
    assert trainable == _trainable(theirs)
    for model in (ours, theirs):
        model.merge_adapter()
    q_ours = ours.get_base_model().model.layers[0].self_attn.q_proj
    q_theirs = theirs.get_base_model().model.layers[0].self_attn.q_proj
    for model in (ours, theirs):
        with model.disable_adapter():
            torch.testing.assert_close(_logits(model, input_ids), base, atol=1e-5, rtol=0)
            assert _trainable(model) == set()
            with model.disable_adapter():  # nested: the inner exit leaves the adapters disabled
                pass
            torch.testing.assert_close(_logits(model, input_ids), base, atol=1e-5, rtol=0)
    assert q_ours.merged_adapters == q_theirs.merged_adapters == []  # unmerged inside, and stays so
    for model in (ours, theirs):
        assert _trainable(model) == trainable
        torch.testing.assert_close(_logits(model, input_ids), adapted, atol=1e-5, rtol=0)
        with pytest.raises(KeyError), model.disable_adapter():
            raise KeyError("inside the block")
        torch.testing.assert_close(_logits(model, input_ids), adapted, atol=1e-5, rtol=0)


def test_disable_adapter_keeps_an_inference_adapter_frozen(tmp_path):
    """PEFT turns on gradients of the active adapter on exit, even one loaded for inference; lorakit restores."""
    _saved_by_peft(tmp_path)
    ours = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with ours.disable_adapter():
        pass
    assert _trainable(ours) == set()


def test_disable_adapter_warns_about_biases_as_peft():
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], bias="all"))
    with pytest.warns(UserWarning, match="bias configured to be 'all'"), model.disable_adapter():
        pass


# ------------------------------------------------------------------------------------------ set_adapter
def test_set_adapter_inference_mode_freezes_as_peft(tmp_path):
    theirs, ours = _both_models()
    for model in (theirs, ours):
        model.set_adapter("default", inference_mode=True)
    assert _trainable(ours) == _trainable(theirs) == set()
    for model in (theirs, ours):
        model.set_adapter("default")
    assert _trainable(ours) == _trainable(theirs) != set()


# ------------------------------------------------------------------------------------------- model card
def test_model_card_metadata_matches_peft_s(tmp_path):
    cards = {}
    for name, library in (("ours", lorakit), ("theirs", peft)):
        model = tiny_llama()
        model.config._name_or_path = model.name_or_path = "org/tiny-base"
        config = library.LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS)
        library.get_peft_model(model, config).save_pretrained(tmp_path / name)
        cards[name] = ModelCard.load(tmp_path / name / "README.md").data.to_dict()
    assert cards["ours"] == cards["theirs"]
    assert cards["ours"]["library_name"] == "peft" and cards["ours"]["base_model"] == "org/tiny-base"
    assert set(cards["ours"]["tags"]) == {"lora", "transformers", "base_model:adapter:org/tiny-base"}
    assert cards["ours"]["pipeline_tag"] == "text-generation"


def test_model_card_keeps_an_existing_body_and_metadata(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags:\n- mine\n---\n\n# My adapter\n\nNotes.\n")
    get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS)).save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "peft"
    assert {"mine", "lora", "transformers"} <= set(card.data.tags)
    assert (
        card.text.startswith("\n# My adapter\n\nNotes.") and f"- lorakit {lorakit.__version__}" in card.text
    )


# ------------------------------------------------------------------------------------------------ saving
def test_save_pretrained_takes_tensors_from_a_given_state_dict(tmp_path):
    """transformers' Trainer passes the full state dict, possibly with a DDP / FSDP wrapper's key infixes."""
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"]))
    given = {f"module.{k}": v + 1.0 for k, v in model.state_dict().items()}  # DDP-style keys, other values
    model.save_pretrained(tmp_path, state_dict=given)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    live = lorakit.get_peft_model_state_dict(model)
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k] + 1.0) for k in saved)
    fsdp_like = {
        k.replace("model.layers.", "model._fsdp_wrapped_module.layers."): v for k, v in given.items()
    }
    model.save_pretrained(tmp_path / "fsdp", state_dict=fsdp_like)
    assert all(
        torch.equal(v, saved[k])
        for k, v in load_file(tmp_path / "fsdp" / "adapter_model.safetensors").items()
    )


def test_save_pretrained_refuses_shards_pickle_and_missing_tensors(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    state = model.state_dict()
    sharded = {k: (v.flatten()[:3] if "lora_A" in k else v) for k, v in state.items()}
    with pytest.raises(ValueError, match="looks like a shard"):
        model.save_pretrained(tmp_path / "a", state_dict=sharded)
    with pytest.raises(ValueError, match="has no tensor for .*lora_A"):
        model.save_pretrained(
            tmp_path / "b", state_dict={k: v for k, v in state.items() if "lora_A" not in k}
        )
    with pytest.raises(ValueError, match="lorakit never writes.*arbitrary code"):
        model.save_pretrained(tmp_path / "c", safe_serialization=False)
    assert not any((tmp_path / d).exists() for d in "abc")  # nothing half-written


def test_save_embedding_layers_true_saves_them_and_loads_back(input_ids, tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight.mul_(1.1)  # e.g. a resized, retrained embedding
    model.save_pretrained(tmp_path, save_embedding_layers=True)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    for loaded in (
        PeftModel.from_pretrained(tiny_llama(), tmp_path),
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path),
    ):
        torch.testing.assert_close(
            _logits(loaded, input_ids), _logits(model.eval(), input_ids), atol=1e-5, rtol=0
        )


def test_after_merge_and_unload_the_wrapper_refuses_clearly(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, init_lora_weights=False))
    model.merge_and_unload()
    for action in (lambda: model.set_adapter("default"), lambda: model.save_pretrained(tmp_path)):
        with pytest.raises(ValueError, match="merge_and_unload\\(\\) or unload\\(\\)"):
            action()
    assert not tmp_path.joinpath("adapter_model.safetensors").exists()


def test_saving_with_no_adapter_left_is_an_error(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter left to save"):
        model.save_pretrained(tmp_path)
