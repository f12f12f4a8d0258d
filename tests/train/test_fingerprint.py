"""Resume refuses a changed run: config fields, token ids and base weights are fingerprinted in checkpoints."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time

import pytest
import torch

from lorakit.train.checkpoint import CheckpointError
from lorakit.train.config import FIELD_NAMES, ConfigError, TrainConfig, load_config
from lorakit.train.fingerprint import (
    BOOKKEEPING_FIELDS,
    SAFE_FIELDS,
    SOURCE_FIELDS,
    ResumeMismatch,
    config_fingerprint,
    token_digest,
    weights_digest,
)
from lorakit.train.loop import train

from .helpers import adapter_tensors, qa_records, save_tiny_model, tiny_run_flags, write_jsonl

CHECKPOINT = "step-00000002"


def _flags(inputs, output_dir, **overrides):
    settings = dict(max_steps=4, save_steps=2, save_total_limit=3, eval_steps=2, sample_max_new_tokens=0)
    return tiny_run_flags(inputs, output_dir, **(settings | overrides))


def _train(inputs, output_dir, **overrides):
    return train(load_config(None, _flags(inputs, output_dir, **overrides)))


@pytest.fixture(scope="module")
def finished_run(tiny_run_inputs, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    output_dir = tmp_path_factory.mktemp("fingerprint") / "run"
    return output_dir, _train(tiny_run_inputs, output_dir)


def _interrupted_copy(finished_run, target):
    """``target`` holds the run as if killed after its step-2 checkpoint (config.yaml included)."""
    source, _ = finished_run
    shutil.copytree(source / "checkpoints" / CHECKPOINT, target / "checkpoints" / CHECKPOINT)
    shutil.copy(source / "config.yaml", target / "config.yaml")
    return target


# --------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(learning_rate=2e-2), "learning_rate: 0.01 -> 0.02"),
        (dict(lora_alpha=16), "lora_alpha: 8.0 -> 16.0"),
        (dict(seed=7), "seed: 42 -> 7"),
        (dict(lora_dropout=0.1), "lora_dropout: 0.0 -> 0.1"),
        (dict(lr_scheduler="linear"), "lr_scheduler: cosine -> linear"),
        ("other_data", "train data: 24 examples"),
        ("other_model", "base model weights: sha256"),
    ],
)
def test_changed_run_is_refused_naming_the_difference(
    change, named, finished_run, tiny_run_inputs, tmp_path
) -> None:
    run_dir = _interrupted_copy(finished_run, tmp_path / "run")
    config_yaml = (run_dir / "config.yaml").read_bytes()
    if change == "other_data":  # same size, same lengths, other text
        change = dict(dataset=str(write_jsonl(tmp_path / "other.jsonl", qa_records(24, offset=50))))
    elif change == "other_model":  # same shapes, another seed
        change = dict(model=str(save_tiny_model(tmp_path / "other-model", seed=1)))
    with pytest.raises(ResumeMismatch) as refused:
        _train(tiny_run_inputs, run_dir, resume=True, **change)
    message = str(refused.value)
    assert named in message and "can never be overridden" in message, message
    assert len([line for line in message.splitlines() if line.startswith("  ")]) == 1, message
    assert (run_dir / "config.yaml").read_bytes() == config_yaml  # not rewritten by the refused run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [CHECKPOINT]


def test_one_error_lists_every_difference(finished_run, tiny_run_inputs, tmp_path) -> None:
    run_dir = _interrupted_copy(finished_run, tmp_path / "run")
    with pytest.raises(ResumeMismatch) as refused:
        _train(tiny_run_inputs, run_dir, resume=True, learning_rate=2e-2, seed=7, save_steps=1, max_steps=5)
    message = str(refused.value)
    for line in ("learning_rate: 0.01 -> 0.02", "seed: 42 -> 7", "max_steps: 4 -> 5", "save_steps: 2 -> 1"):
        assert f"  {line}" in message, message
    assert "save_steps: 2 -> 1  (safe to change)" in message
    assert "never be overridden: learning_rate, max_steps, seed" in message
    assert "--resume_allow_changes save_steps" in message
    assert isinstance(refused.value, CheckpointError)  # the CLI prints it as one error, no traceback


def test_safe_change_needs_the_flag_and_unsafe_fields_can_never_be_allowed(
    finished_run, tiny_run_inputs, tmp_path
) -> None:
    run_dir = _interrupted_copy(finished_run, tmp_path / "run")
    with pytest.raises(ResumeMismatch, match="add --resume_allow_changes eval_steps"):
        _train(tiny_run_inputs, run_dir, resume=True, eval_steps=1)
    with pytest.raises(ConfigError, match="learning_rate change.*can never be overridden"):
        _train(
            tiny_run_inputs, run_dir, resume=True, learning_rate=2e-2, resume_allow_changes="lr,eval_steps"
        )
    with pytest.raises(ConfigError, match="unknown field.*eval_stepz"):
        _train(tiny_run_inputs, run_dir, resume=True, resume_allow_changes="eval_stepz")


# --------------------------------------------------------------------------------------- accepted
def test_early_stopping_can_be_turned_on_when_resuming(finished_run, tiny_run_inputs, tmp_path) -> None:
    """early_stopping_patience none -> 3 is a safe change: refused unless named, then it resumes (best/ is
    written with or without early stopping, so nothing derived from it may block the change)."""
    run_dir = _interrupted_copy(finished_run, tmp_path / "run")
    with pytest.raises(ResumeMismatch) as refused:
        _train(tiny_run_inputs, run_dir, resume=True, early_stopping_patience=3)
    message = str(refused.value)
    assert "  early_stopping_patience: none -> 3  (safe to change)" in message
    assert len([line for line in message.splitlines() if line.startswith("  ")]) == 1, message
    assert "add --resume_allow_changes early_stopping_patience" in message
    result = _train(
        tiny_run_inputs,
        run_dir,
        resume=True,
        early_stopping_patience=3,
        resume_allow_changes="early_stopping_patience",
    )
    assert result.summary["steps"] == 4 and result.summary["best_step"] in (2, 4)
    assert (run_dir / "best" / "best.json").is_file()
    assert (
        json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())[
            "fingerprint"
        ]["config"]["early_stopping_patience"]
        == 3
    )


def test_allowed_safe_change_and_moved_inputs_resume_exactly(
    finished_run, tiny_run_inputs, tmp_path, capsys
) -> None:
    """eval_steps changed (allowed), model and data copied elsewhere: the same adapter as the full run."""
    _, full = finished_run
    run_dir = _interrupted_copy(finished_run, tmp_path / "run")
    model = shutil.copytree(tiny_run_inputs["model"], tmp_path / "moved-model")
    data = shutil.copy(tiny_run_inputs["train"], tmp_path / "moved-train.jsonl")
    capsys.readouterr()
    resumed = _train(
        tiny_run_inputs,
        run_dir,
        resume=True,
        eval_steps=1,
        resume_allow_changes="eval_steps",
        model=str(model),
        dataset=str(data),
    )
    out = capsys.readouterr().out
    assert "resume: eval_steps: 2 -> 1 (allowed by resume_allow_changes)" in out
    assert f"resume: continuing from {run_dir / 'checkpoints' / CHECKPOINT}" in out
    expected, got = adapter_tensors(full.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert "eval_steps: 1" in (run_dir / "config.yaml").read_text()  # rewritten once the check passed
    saved = json.loads((run_dir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert saved["fingerprint"]["config"]["eval_steps"] == 1  # later checkpoints record the new value


def test_checkpoint_without_fingerprint_resumes_with_a_warning(
    finished_run, tiny_run_inputs, tmp_path, capsys
) -> None:
    run_dir = _interrupted_copy(finished_run, tmp_path / "run")
    state_file = run_dir / "checkpoints" / CHECKPOINT / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"]  # as written before fingerprints existed
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    resumed = _train(tiny_run_inputs, run_dir, resume=True, learning_rate=2e-2)  # unchecked: accepted
    assert "could not check that model, data and settings are unchanged" in capsys.readouterr().out
    assert resumed.summary["steps"] == 4


# ---------------------------------------------------------------------------------------- pieces
def test_every_config_field_is_fingerprinted_unless_listed() -> None:
    """Deny by default: the lists name real fields, and a new field is fingerprinted automatically."""
    assert BOOKKEEPING_FIELDS | SOURCE_FIELDS | SAFE_FIELDS <= set(FIELD_NAMES)
    assert not SAFE_FIELDS & (BOOKKEEPING_FIELDS | SOURCE_FIELDS)
    fingerprinted = set(config_fingerprint(TrainConfig()))
    assert fingerprinted == set(FIELD_NAMES) - BOOKKEEPING_FIELDS - SOURCE_FIELDS
    assert {
        "learning_rate",
        "lora_alpha",
        "seed",
        "lora_dropout",
        "lr_scheduler",
        "max_steps",
    } <= fingerprinted

    @dataclasses.dataclass
    class Extended(TrainConfig):
        new_knob: float = 0.5

    assert config_fingerprint(Extended())["new_knob"] == 0.5


def test_token_digest_follows_ids_order_and_labels() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    digest = token_digest(examples)
    assert (digest["examples"], digest["tokens"]) == (2, 5)
    assert token_digest([dict(e) for e in examples]) == digest
    assert token_digest(examples[::-1])["sha256"] != digest["sha256"]
    relabelled = [examples[0] | {"labels": [5, 6, 7]}, examples[1]]  # train_on_prompt-like change
    assert token_digest(relabelled)["sha256"] != digest["sha256"]
    split = [{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7, 8, 9], "labels": [7, 8, 9]}]
    joined = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    assert token_digest(split)["sha256"] != token_digest(joined)["sha256"]  # boundaries count


def test_weights_digest_identifies_weights_not_paths(tmp_path) -> None:
    first = save_tiny_model(tmp_path / "a", seed=0)
    copy = shutil.copytree(first, tmp_path / "b")
    other = save_tiny_model(tmp_path / "c", seed=1)
    assert weights_digest(first) == weights_digest(copy) != weights_digest(other)
    assert weights_digest(tmp_path) is None  # no safetensors


def test_hashing_the_default_runs_data_is_cheap() -> None:
    """300 examples of about 60 tokens (the bundled sample's size): far below a model load."""
    examples = [{"input_ids": list(range(i, i + 60)), "labels": list(range(i, i + 60))} for i in range(300)]
    started = time.perf_counter()
    token_digest(examples)
    assert time.perf_counter() - started < 0.5


def test_models_without_files_to_hash_are_compared_by_name() -> None:
    from lorakit.train.fingerprint import compare

    def fingerprint(name):
        return {
            "config": {},
            "data": {s: {"examples": 1, "tokens": 1, "sha256": "x"} for s in ("train", "eval")},
            "model": {"name": name, "config": None, "weights_sha256": None},
            "run": {"processes": 1},
        }

    assert compare(fingerprint("org/a"), fingerprint("org/a")) == []
    assert [str(d) for d in compare(fingerprint("org/a"), fingerprint("org/b"))] == [
        "base model: org/a -> org/b"
    ]
