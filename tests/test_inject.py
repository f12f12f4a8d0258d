"""Which modules a config targets, and the errors when it targets wrongly."""

from __future__ import annotations

import pytest

from lorakit import LoraConfig, get_peft_model
from lorakit.inject import find_targets
from lorakit.layers import LoraLayer
from tests.conftest import tiny_gpt2, tiny_llama


def _adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def test_list_matches_exact_or_dot_suffix():
    names = find_targets(tiny_llama(), LoraConfig(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_list_does_not_match_partial_names():
    # "proj" is not a suffix after a dot of "q_proj", so it matches nothing and is an error
    with pytest.raises(ValueError, match="'proj' matches no module"):
        find_targets(tiny_llama(), LoraConfig(target_modules=["proj"]))


def test_string_is_a_full_match_regex():
    names = find_targets(tiny_llama(), LoraConfig(target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_all_linear_skips_the_output_head():
    names = find_targets(tiny_llama(), LoraConfig(target_modules="all-linear"))
    assert len(names) == 2 * 7 and "lm_head" not in names
    gpt2_names = find_targets(tiny_gpt2(), LoraConfig(target_modules="all-linear"))
    assert len(gpt2_names) == 2 * 4 and "lm_head" not in gpt2_names  # Conv1D: c_attn, c_proj x2, c_fc


def test_exclude_modules_wins():
    names = find_targets(tiny_llama(), LoraConfig(target_modules="all-linear", exclude_modules=["down_proj"]))
    assert not any(n.endswith("down_proj") for n in names) and len(names) == 2 * 6


def test_layers_to_transform_with_pattern():
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert find_targets(tiny_llama(), config) == ["model.layers.1.self_attn.q_proj"]


def test_rank_and_alpha_patterns_override_per_module():
    model = get_peft_model(
        tiny_llama(),
        LoraConfig(
            target_modules=["q_proj", "v_proj"],
            r=8,
            lora_alpha=16,
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4},
        ),
    )
    base = model.get_base_model()
    v = base.model.layers[0].self_attn.v_proj
    q1 = base.model.layers[1].self_attn.q_proj
    q0 = base.model.layers[0].self_attn.q_proj
    assert v.r["default"] == 2 and v.scaling["default"] == 16 / 2
    assert q1.r["default"] == 8 and q1.scaling["default"] == 4 / 8
    assert q0.scaling["default"] == 16 / 8


def test_unknown_target_lists_existing_names():
    with pytest.raises(ValueError, match=r"'qproj' matches no module.*q_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["qproj"]))


def test_unsupported_target_type_says_what_to_target_instead():
    with pytest.raises(TypeError, match=r"self_attn.*LlamaAttention.*q_proj"):
        get_peft_model(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_missing_target_modules_is_an_error():
    with pytest.raises(ValueError, match="target_modules is not set"):
        get_peft_model(tiny_llama(), LoraConfig())


def test_failed_injection_leaves_no_wrapper_behind():
    model = tiny_llama()
    with pytest.raises(ValueError):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "nope"]))
    assert _adapted(model) == []
