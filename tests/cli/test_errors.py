"""Errors the user can fix end a command with one line, ``lorakit <cmd>: error: <message>``, and no traceback;
exceptions that are bugs keep theirs."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import is_user_error, main
from lorakit.data import DatasetError
from lorakit.models import ModelLoadError, load_model

from ..train.helpers import qa_records, save_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("errors")
    model_dir = save_tiny_model(root / "model")  # 256 positions
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(root / "adapter")
    return {
        "model": model_dir,
        "adapter": root / "adapter",
        "data": write_jsonl(root / "d.jsonl", qa_records(8)),
    }


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # after the weight-loading progress bar, if any
    assert last.startswith(f"lorakit {command}: error: "), err
    return last


# ------------------------------------------------------------------------------------------ which errors
def _raise_from_lorakit():
    from lorakit.inject import find_targets

    find_targets(
        torch.nn.Linear(2, 2), LoraConfig(target_modules=None)
    )  # a `raise ValueError(...)` in lorakit


def test_user_errors_and_bugs_are_told_apart(tmp_path):
    with pytest.raises(ValueError) as from_lorakit:
        _raise_from_lorakit()
    assert is_user_error(from_lorakit.value)
    assert is_user_error(DatasetError("d.jsonl, line 3: bad"))  # lorakit's own classes
    with pytest.raises(FileNotFoundError) as missing:
        open(tmp_path / "nope")
    assert is_user_error(missing.value)  # an OSError naming its file
    with pytest.raises(ValueError) as from_here:
        int("not a number")  # raised outside lorakit: a bug, keeps its traceback
    assert not is_user_error(from_here.value)
    assert not is_user_error(RuntimeError("boom")) and not is_user_error(KeyboardInterrupt())


def test_main_prints_one_line_for_a_user_error_and_re_raises_a_bug(monkeypatch, capsys):
    import lorakit.cli.merge as merge

    monkeypatch.setattr(merge, "run", lambda args: _raise_from_lorakit())
    assert main(["merge", "--adapter", "a", "--output_dir", "b"]) == 1
    assert "target_modules is not set" in _one_line_error(capsys, "merge")

    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(merge, "run", bug)
    with pytest.raises(KeyError):
        main(["merge", "--adapter", "a", "--output_dir", "b"])


# -------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize(
    "content, message",
    [
        (
            b'{"r": 4,',
            r"adapter_config\.json is not valid JSON \(.* at line 1, column 9\): the file is corrupt",
        ),
        (b"\xff\xfe\x00garbage", r"adapter_config\.json is not UTF-8 text: the file is corrupt"),
        (b"[1, 2]", r"adapter_config\.json must hold a JSON object, found list"),
    ],
)
def test_merge_with_a_corrupt_adapter_config_names_the_file(assets, tmp_path, capsys, content, message):
    adapter = shutil.copytree(assets["adapter"], tmp_path / "adapter")
    (adapter / "adapter_config.json").write_bytes(content)
    assert main(["merge", "--adapter", str(adapter), "--output_dir", str(tmp_path / "out")]) == 1
    err = _one_line_error(capsys, "merge")
    assert str(adapter / "adapter_config.json") in err
    assert re.search(message, err), err


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("with_model", [False, True], ids=["adapter-base", "model-given"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00garbage", r"adapter_config\.json is not UTF-8 text: the file is corrupt"),
        (
            b'{"r": 4,',
            r"adapter_config\.json is not valid JSON \(.* at line 1, column 9\): the file is corrupt",
        ),
        (b"[1, 2]", r"adapter_config\.json must hold a JSON object, found list"),
    ],
    ids=["not-utf8", "not-json", "not-object"],
)
def test_eval_and_generate_with_a_corrupt_adapter_config_name_the_file(
    assets, tmp_path, capsys, command, with_model, content, message
):
    """Without --model the base is read from the file (adapter_base_model); with it, PeftModel reads it."""
    adapter = shutil.copytree(assets["adapter"], tmp_path / "adapter")
    (adapter / "adapter_config.json").write_bytes(content)
    flags = ["--adapter", str(adapter), "--device", "cpu"] + (["--model", str(assets["model"])] * with_model)
    extra = ["--dataset", str(assets["data"])] if command == "eval" else ["--max_new_tokens", "1", "hi"]
    assert main([command, *flags, *extra]) == 1
    err = _one_line_error(capsys, command)
    assert str(adapter / "adapter_config.json") in err
    assert re.search(message, err), err


def test_eval_max_seq_length_beyond_the_models_positions(assets, capsys):
    flags = ["eval", "--model", str(assets["model"]), "--dataset", str(assets["data"]), "--device", "cpu"]
    assert main([*flags, "--max_seq_length", "512"]) == 1
    err = _one_line_error(capsys, "eval")
    assert "'max_seq_length' is 512, but the model has only 256 positions (max_position_embeddings)" in err
    assert main([*flags, "--max_seq_length", "256", "--json"]) == 0  # the model's length itself is fine
    full = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert main([*flags, "--json"]) == 0  # the default (1024) is capped at the model's 256 positions
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == full


def test_merge_out_pointing_at_a_file_is_an_error(assets, tmp_path, capsys):
    target = tmp_path / "merged.safetensors"
    target.write_text("keep me")
    assert main(["merge", "--adapter", str(assets["adapter"]), "--out", str(target)]) == 1
    assert f"{target} is a file, not a folder" in _one_line_error(capsys, "merge")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_model_safetensors_is_named(assets, tmp_path, capsys, damage):
    model = shutil.copytree(assets["model"], tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x07" * 100}[damage])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is corrupt or truncated"):
        load_model(str(model))
    out = tmp_path / "out"
    assert (
        main(["merge", "--adapter", str(assets["adapter"]), "--model", str(model), "--output_dir", str(out)])
        == 1
    )
    assert f"{weights} is corrupt or truncated" in _one_line_error(capsys, "merge")


# -------------------------------------------------------------------------------------------------- train
def _train(assets, tmp_path, *flags: str) -> int:
    return main(
        [
            "train",
            "--model", str(assets["model"]),
            "--dataset", str(assets["data"]),
            "--output_dir", str(tmp_path / "run"),
            "--max_steps", "1",
            "--device", "cpu",
            *flags,
        ]
    )  # fmt: skip


def test_train_max_seq_length_beyond_the_models_positions(assets, tmp_path, capsys):
    assert (
        _train(assets, tmp_path, "--max_seq_length", "512") == 2
    )  # a config error, found once the model is known
    err = _one_line_error(capsys, "train")
    assert "'max_seq_length' is 512, but the model has only 256 positions (max_position_embeddings)" in err


def test_train_modules_to_save_matching_nothing(assets, tmp_path, capsys):
    assert _train(assets, tmp_path, "--max_seq_length", "64", "--modules_to_save", "lm_hed") == 2
    err = _one_line_error(capsys, "train")
    assert "modules_to_save entry 'lm_hed' matches no module of the model" in err


def test_train_config_file_that_is_binary(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_bytes(bytes(range(256)))
    assert main(["train", str(path)]) == 2
    assert f"Config file '{path}' is not" in _one_line_error(capsys, "train")


def test_data_reading_error_reaches_the_user_as_one_line(assets, tmp_path, capsys):
    data = tmp_path / "d.csv"
    data.write_text('instruction,output\n"open,1\nb,2\n')
    assert _train({**assets, "data": data}, tmp_path, "--max_seq_length", "64") == 1
    assert f"{data}, line 2: a quote opened in this row is never closed" in _one_line_error(capsys, "train")
