"""LoraConfig validation and its PEFT-compatible JSON."""

from __future__ import annotations

import json

import pytest

from lorakit import LoraConfig, TaskType
from lorakit.config import load_adapter_config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-4), "r must be a positive integer"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (dict(bias="some"), "bias must be"),
        (dict(task_type="CAUSAL"), "Unknown task_type 'CAUSAL'; use one of: CAUSAL_LM"),
        (dict(init_lora_weights="xavier"), "init_lora_weights must be"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\]"),
    ],
)
def test_bad_values_are_rejected_with_the_field_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(target_modules=["q"], **kwargs)


def test_task_type_accepts_strings_and_enum():
    assert LoraConfig(task_type="seq_cls").task_type is TaskType.SEQ_CLS
    assert LoraConfig(task_type=TaskType.CAUSAL_LM).task_type is TaskType.CAUSAL_LM


def test_json_round_trip(tmp_path):
    config = LoraConfig(
        task_type="CAUSAL_LM",
        target_modules={"v_proj", "q_proj"},
        r=4,
        lora_alpha=32,
        rank_pattern={"q_proj": 2},
        use_rslora=True,
    )
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["target_modules"] == ["q_proj", "v_proj"]
    assert LoraConfig.from_pretrained(tmp_path) == config


def test_unknown_keys_warn_and_are_ignored(tmp_path):
    data = LoraConfig(target_modules=["q_proj"]).to_dict() | {"some_future_option": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="some_future_option"):
        config = load_adapter_config(tmp_path)
    assert config.target_modules == ["q_proj"]


def test_peft_feature_lorakit_lacks_is_refused_not_ignored(tmp_path):
    data = LoraConfig(target_modules=["q_proj"]).to_dict() | {"lora_bias": True}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lora_bias"):
        load_adapter_config(tmp_path)


def test_corrupt_or_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
        load_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter_config(tmp_path)
