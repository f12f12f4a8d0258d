"""Config: defaults < YAML < flags, nested/dotted keys, type coercion, errors with suggestions."""

from __future__ import annotations

import math

import pytest

from lorakit.train.config import ConfigError, TrainConfig, config_to_yaml, load_config
from lorakit.train.schedule import lr_factor, resolve_warmup


def test_defaults_then_yaml_then_flags(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\n  alpha: 16\nlearning_rate: 3e-4\ntarget_modules: [q_proj, v_proj]\n")
    config = load_config(path, {"lora.r": "32", "micro-batch-size": "2", "use_dora": "true"})
    assert config.lora_r == 32  # flag wins over YAML
    assert config.lora_alpha == 16.0 and config.learning_rate == 3e-4  # YAML "3e-4" is a str for PyYAML
    assert config.micro_batch_size == 2 and config.use_dora is True
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.seed == TrainConfig().seed  # untouched default


def test_aliases_and_lists_from_flags() -> None:
    config = load_config(
        None, {"lr": "1e-4", "epochs": "2", "target_modules": "q_proj,k_proj", "max_steps": "none"}
    )
    assert config.learning_rate == 1e-4 and config.num_epochs == 2.0
    assert config.target_modules == ["q_proj", "k_proj"] and config.max_steps is None


def test_method_dora_sets_use_dora() -> None:
    assert load_config(None, {"method": "dora"}).use_dora is True


def test_print_config_round_trips(tmp_path) -> None:
    config = load_config(None, {"lora_r": "4", "sample_prompts": ["a", "b"], "loraplus_lr_ratio": "16"})
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lora_rr": "4"}, "Unknown option '--lora_rr'. Did you mean 'lora_r'"),
        ({"learning_rat": "1"}, "Did you mean 'learning_rate'"),
        ({"lora_r": "four"}, "'lora_r' must be int, got 'four'"),
        ({"lr_scheduler": "cosin"}, "Did you mean 'cosine'"),
        ({"precision": "bf32"}, "must be one of fp32, bf16, fp16"),
        ({"micro_batch_size": "0"}, "'micro_batch_size' must be > 0"),
        ({"use_dora": "maybe"}, "'use_dora' must be true or false"),
        ({"lora_dropout": "1.5"}, "'lora_dropout' must be in [0, 1)"),
    ],
)
def test_bad_flags_are_clear_errors(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, values)
    assert message in str(error.value)


def test_bad_yaml_key_names_file_and_suggestion(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"Unknown key 'lora_rank' in .*c.yaml\. Did you mean 'lora_r'"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_schedule_formulas() -> None:
    total, warmup = 10, 2
    assert [lr_factor(s, total, warmup, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, total, warmup, "linear") for s in range(2, 10)] == [1 - k / 8 for k in range(8)]
    cosine = [lr_factor(s, total, warmup, "cosine") for s in range(2, 10)]
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)], abs=1e-12)
    assert lr_factor(0, 5, 0, "linear") == 1.0 and lr_factor(4, 5, 0, "linear") == pytest.approx(0.2)


def test_warmup_resolution() -> None:
    assert resolve_warmup(100, None, 0.1) == 10
    assert resolve_warmup(100, 7, 0.5) == 7
    assert resolve_warmup(3, None, 0.1) == 1
    assert resolve_warmup(1, None, 0.5) == 0  # a single step must not be all warm-up at lr / W
