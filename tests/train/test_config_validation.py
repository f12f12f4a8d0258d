"""Config validation: non-finite numbers, unreadable config files, one key spelled twice, DoRA contradictions and a
max_seq_length beyond the model's positions are errors naming the key (or file), not silent choices."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lorakit.cli import main
from lorakit.train.config import ConfigError, TrainConfig, config_from_dict, load_config
from lorakit.train.config_checks import check_against_model


# ------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    "key, value",
    [
        ("learning_rate", "nan"),
        ("lora_alpha", "inf"),
        ("max_grad_norm", "nan"),  # NaN compares false with everything: clipping would silently be off
        ("lora_dropout", "nan"),
        ("weight_decay", "-inf"),
        ("num_epochs", "inf"),
        ("eval_split", "nan"),
        ("early_stopping_threshold", "nan"),
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number, got -?(nan|inf)"):
        load_config(None, {key: value})


def test_non_finite_yaml_numbers_and_int_overflow_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_grad_norm: .nan\n")
    with pytest.raises(ConfigError, match="'max_grad_norm' must be a finite number"):
        load_config(path)
    with pytest.raises(ConfigError, match="'lora_r' must be int, got 'inf'"):
        load_config(None, {"lora_r": "inf"})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_alpha", "0", "'lora_alpha' must be > 0"),
        ("adam_epsilon", "0", "'adam_epsilon' must be > 0"),
        ("adam_beta2", "1", r"'adam_beta2' must be in \[0, 1\)"),
    ],
)
def test_positive_and_range_checks(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {key: value})


def test_cli_reports_nan_as_one_line(capsys):
    assert main(["train", "--learning_rate", "nan", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "lorakit train: error: 'learning_rate' must be a finite number, got nan."


# --------------------------------------------------------------------------------------------- YAML files
def test_binary_config_file_is_named_as_not_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    with pytest.raises(ConfigError, match=r"c\.yaml' is not UTF-8 text \(byte 0x89 on line 1\)"):
        load_config(path)
    path.write_bytes(b"lora_r: 8\n\x00\x01\x02")
    with pytest.raises(ConfigError, match=r"c\.yaml' is not a YAML text file: .*U\+0000 on line 2"):
        load_config(path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just words\n", "str"), ("42\n", "int")])
def test_config_that_is_not_a_mapping_names_file_and_what_it_holds(tmp_path, text, kind):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=rf"c\.yaml' must be a mapping of key: value lines .* holds a {kind}"
    ):
        load_config(path)


# ------------------------------------------------------------------------------------- one key, two spellings
@pytest.mark.parametrize(
    "text, first, second",
    [
        ("lora:\n  r: 8\nlora_r: 16\n", "lora.r", "lora_r"),
        ("r: 8\nlora_r: 16\n", "r", "lora_r"),
        ("lr: 1e-4\nlearning_rate: 3e-4\n", "lr", "learning_rate"),
    ],
)
def test_yaml_key_spelled_twice_with_different_values_is_an_error(tmp_path, text, first, second):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"is set twice in .*c\.yaml: as '{first}' .* and as '{second}'"):
        load_config(path)


def test_same_value_under_two_spellings_passes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 8\nlora_r: 8\nlr: 1e-3\nlearning_rate: 0.001\n")
    config = load_config(path)
    assert config.lora_r == 8 and config.learning_rate == 1e-3


def test_library_dict_and_overrides_are_checked_too():
    with pytest.raises(ConfigError, match="'lora_r' is set twice"):
        config_from_dict({"lora": {"r": 8}, "lora_r": 16})
    with pytest.raises(ConfigError, match=r"as '--r' \(8\) and as '--lora_r' \(16\)"):
        load_config(None, {"r": 8, "lora_r": 16})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--r", "8", "--lora_r", "16"], "--r 8 and --lora_r 16 both set 'lora_r'"),
        (["--lora.r=8", "--lora-r", "16"], "--lora.r 8 and --lora-r 16 both set 'lora_r'"),
        (["--out", "a", "--output_dir", "b"], "--out a and --output_dir b both set 'output_dir'"),
        (["--target_modules", "q", "v", "--target-modules", "q"], None),  # one spelling repeated: last wins
        (["--lr", "1e-3", "--learning_rate", "0.001"], None),  # the same value
    ],
)
def test_cli_flag_spelled_twice(flags, message, capsys):
    if message is None:
        assert main(["train", *flags, "--print-config"]) == 0
        return
    with pytest.raises(SystemExit) as exited:  # a usage error, reported by argparse
        main(["train", *flags, "--print-config"])
    assert exited.value.code == 2
    assert f"lorakit train: error: {message}; give it once." in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ DoRA
def test_method_dora_with_use_dora_false_is_a_contradiction(tmp_path):
    with pytest.raises(ConfigError, match="'method: dora' and 'use_dora: false' contradict each other"):
        load_config(None, {"method": "dora", "use_dora": "false"})
    path = tmp_path / "c.yaml"
    path.write_text("method: dora\n")
    with pytest.raises(ConfigError, match=r"c\.yaml with the flags: 'method: dora' and 'use_dora: false'"):
        load_config(path, {"use_dora": "false"})


def test_method_flag_decides_over_the_files_use_dora(tmp_path):
    # A resolved config (--print-config) of a LoRA run holds use_dora: false; --method dora must still work,
    # and one of a DoRA run holds use_dora: true, which --method lora must not keep.
    path = tmp_path / "c.yaml"
    path.write_text("method: lora\nuse_dora: false\n")
    assert load_config(path, {"method": "dora"}).use_dora is True
    path.write_text("method: dora\nuse_dora: true\n")
    assert load_config(path, {"method": "lora"}).use_dora is False


# -------------------------------------------------------------------------------------- against the model
def test_max_seq_length_beyond_the_models_positions_is_an_error():
    config = TrainConfig(max_seq_length=4096)
    with pytest.raises(ConfigError, match=r"'max_seq_length' is 4096, but the model has only 2048 positions"):
        check_against_model(config, SimpleNamespace(max_position_embeddings=2048))
    check_against_model(TrainConfig(max_seq_length=2048), SimpleNamespace(max_position_embeddings=2048))
    check_against_model(config, SimpleNamespace())  # a model without the attribute is not checked


@pytest.mark.parametrize("key", ["learning_rate", "lora_alpha", "weight_decay"])
def test_numbers_beyond_float32_are_refused(key):
    """1e39 is finite in Python but inf in float32, where AdamW would crash (or diverge) on the first step."""
    with pytest.raises(ConfigError, match=f"'{key}' = 1e\\+39 is beyond float32's range"):
        config_from_dict({key: "1e39"})
    assert getattr(config_from_dict({key: "3e38"}), key) == 3e38  # still representable


def test_adam_epsilon_that_is_zero_in_float32_is_refused():
    with pytest.raises(ConfigError, match="'adam_epsilon' = 1e-60 is 0 in float32"):
        config_from_dict({"adam_epsilon": 1e-60})
    assert config_from_dict({"adam_epsilon": 1e-30}).adam_epsilon == 1e-30


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("max_steps: 2\nseed: 1\nmax_steps: 4\n", "max_steps", (1, 3)),
        ("lora:\n  r: 16\nlora:\n  alpha: 8\n", "lora", (1, 3)),
        ("lora:\n  r: 16\n  r: 8\n", "r", (2, 3)),
    ],
)
def test_a_key_repeated_in_one_yaml_mapping_is_an_error(tmp_path, text, key, lines):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=f"'{key}' is given twice in one mapping \\(lines {lines[0]} and {lines[1]}\\)"
    ):
        load_config(path, {})
