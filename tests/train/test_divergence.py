"""Divergence: nothing non-finite is ever written, a run that blows up stops non-zero, best/ survives."""

from __future__ import annotations

import errno
import json
import math

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.train import checkpoint as ckpt
from lorakit.train import early_stopping
from lorakit.train.config import load_config
from lorakit.train.divergence import HeldOutRule, TrainingDiverged
from lorakit.train.early_stopping import save_best
from lorakit.train.loop import train

from .helpers import qa_records, tiny_run_flags, write_jsonl
from .subprocess_utils import flag_list


def _safetensors_files_are_finite(folder) -> bool:
    """Every saved parameter and optimizer moment (rng.safetensors codes Python's None as NaN) is finite."""
    files = [f for f in folder.rglob("*.safetensors") if f.name != "rng.safetensors"]
    return all(
        torch.isfinite(t).all() for f in files for t in load_file(str(f)).values() if t.is_floating_point()
    )


# ------------------------------------------------------------------------------------------------ rule
def test_held_out_rule_margin_is_threshold_times_max_best_2() -> None:
    rule = HeldOutRule(threshold=0.5)
    assert rule.check(0, 3.44) is None and rule.check(10, 0.8) is None  # best 0.8: limit 0.8 + 1.0
    assert rule.check(20, 1.79) is None and (rule.best_step, rule.best_loss) == (10, 0.8)
    assert rule.check(30, 1.81).endswith(
        "rose to 1.8100 at step 30, above best 0.8000 (step 10) + "
        "divergence_threshold 0.5 x max(best, 2) = 1.8000"
    )
    high = HeldOutRule(threshold=0.5)
    assert high.check(0, 4.0) is None and high.check(1, 5.99) is None  # best 4: limit 4 + 2
    assert high.check(2, 6.01) is not None
    off = HeldOutRule(threshold=None)
    assert off.check(0, 1.0) is None and off.check(1, 1e9) is None
    assert "became nan" in off.check(2, math.nan)  # non-finite always stops


def test_bad_threshold_is_a_config_error() -> None:
    from lorakit.train.config import ConfigError

    with pytest.raises(ConfigError, match="divergence_threshold"):
        load_config(None, {"divergence_threshold": "0"})
    assert load_config(None, {"divergence_threshold": "none"}).divergence_threshold is None


# ------------------------------------------------------------------------------------- refused writes
@pytest.fixture
def nan_model():
    from .helpers import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(math.nan)
    return model


def test_non_finite_parameters_are_never_written(nan_model, tmp_path) -> None:
    optimizer = torch.optim.AdamW([p for p in nan_model.parameters() if p.requires_grad])
    with pytest.raises(ckpt.NonFiniteError, match=r"Refusing to write .*step-00000003.*lora_B"):
        ckpt.save_checkpoint(
            tmp_path / "checkpoints",
            3,
            model=nan_model,
            optimizer=optimizer,
            trainer_state={},
            rng_states={},
            keep=2,
        )
    with pytest.raises(ckpt.NonFiniteError, match="best"):
        save_best(nan_model, tmp_path / "best", 3, 1.0)
    with pytest.raises(ckpt.NonFiniteError, match="adapter"):
        ckpt.write_adapter(nan_model, tmp_path / "adapter", tmp_path / "checkpoints")
    assert list(tmp_path.iterdir()) == []  # not even a temp folder


def test_learning_rate_inf_writes_nothing_and_fails(tiny_run_inputs, tmp_path, capsys) -> None:
    # Through the CLI (config validation may already refuse inf) and in-process past the validation.
    flags = tiny_run_flags(tiny_run_inputs, tmp_path / "cli", learning_rate="inf", max_steps=1)
    assert main(["train", *flag_list(flags)]) != 0
    assert "lorakit train: error:" in capsys.readouterr().err
    config = load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "run", max_steps=3, save_steps=1))
    config.learning_rate = math.inf
    with pytest.raises(
        TrainingDiverged, match=r"parameter '.*' became (nan|inf) at step 1\. Last good checkpoint: none"
    ):
        train(config)
    for run in ("cli", "run"):
        assert not (tmp_path / run / "adapter").exists() and not (tmp_path / run / "best").exists()
        assert _safetensors_files_are_finite(tmp_path / run)
    assert not (tmp_path / "run" / "checkpoints").exists()


EXPLODE = dict(modules_to_save="lm_head", eval_steps=1, sample_max_new_tokens=0)


def test_learning_rate_1e6_explodes_held_out_loss_and_exits_1(tiny_run_inputs, tmp_path, capsys) -> None:
    flags = tiny_run_flags(tiny_run_inputs, tmp_path / "run", learning_rate="1e6", **EXPLODE)
    assert main(["train", *flag_list(flags)]) == 1
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "lorakit train" in line]  # the rest: progress bars
    assert "held-out loss rose to" in line and "at step 1" in line and "divergence_threshold" in line
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "best").exists()


# lr ramps 0.1, 0.2, 0.3 ...: held-out 4.86 (base) -> 4.37 (step 1, best) -> 4.44 -> 16.5 (step 3).
RAMP = dict(
    EXPLODE,
    learning_rate=0.8,
    warmup_steps=8,
    lr_scheduler="constant",
    max_steps=8,
    save_steps=1,
    save_total_limit=1,
)


def test_exploding_run_stops_and_best_survives_save_total_limit_1(tiny_run_inputs, tmp_path) -> None:
    output_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as stopped:
        train(load_config(None, tiny_run_flags(tiny_run_inputs, output_dir, **RAMP)))
    message = str(stopped.value)
    assert "held-out loss rose to" in message and "at step 3" in message
    assert f"Last good checkpoint: {output_dir / 'checkpoints' / 'step-00000002'}" in message
    assert f"Best held-out adapter: {output_dir / 'best'} (step 1" in message
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == ["step-00000002"]  # step 1 pruned
    assert json.loads((output_dir / "best" / "best.json").read_text())["step"] == 1
    assert not (output_dir / "adapter").exists() and _safetensors_files_are_finite(output_dir)
    # The same run without the rule trains to the end.
    off = dict(RAMP, divergence_threshold="none")
    result = train(load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "off", **off)))
    assert result.summary["steps"] == 8


# ------------------------------------------------------------------------------------------- disk full
# What safetensors 0.8 really raises (seen on a full and on a read-only tmpfs): a SafetensorError, which is
# not an OSError, with Rust's "(os error N)" in its text.
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"
SAFETENSORS_EROFS = (
    'Error while serializing: I/O error: Read-only file system (os error 30) at path "/x/.tmpIkqP1E"'
)


def _disk_full(kind: str, path: str) -> Exception:
    if kind == "safetensors":
        return SafetensorError(SAFETENSORS_ENOSPC)
    return OSError(errno.ENOSPC, "No space left on device", path)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (SAFETENSORS_ENOSPC, errno.ENOSPC),
        (SAFETENSORS_EROFS, errno.EROFS),
        (
            'Error while serializing: IoError(Os { code: 122, kind: QuotaExceeded, message: "x" })',
            errno.EDQUOT,
        ),
        ("Error while serializing: I/O error: Disk quota exceeded (OS Error 122)", errno.EDQUOT),
        ("Error while serializing: I/O error: Permission denied (os error 13)", errno.EACCES),
        ("Error while deserializing header: HeaderTooLarge", None),
    ],
)
def test_write_errno_reads_the_os_error_of_a_safetensors_error(message, code) -> None:
    assert ckpt.write_errno(SafetensorError(message)) == code
    assert ckpt.write_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert ckpt.write_errno(ValueError("os error 28")) is None


@pytest.mark.parametrize("kind", ["safetensors", "oserror"])
def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous(
    tiny_run_inputs, tmp_path, capsys, monkeypatch, kind
) -> None:
    calls = {"n": 0}
    real_save_file = ckpt.save_file

    def full_disk(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint writes 3 safetensors files (no AdaLoRA state)
            raise _disk_full(kind, path)
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    output_dir = tmp_path / "run"
    flags = tiny_run_flags(tiny_run_inputs, output_dir, max_steps=6, save_steps=2)
    assert main(["train", *flag_list(flags)]) == 1
    stderr = capsys.readouterr().err
    [err] = [line for line in stderr.splitlines() if "lorakit train" in line]
    assert "Traceback" not in stderr
    assert "No space left on device" in err and "step-00000004" in err
    assert f"intact (newest: {output_dir / 'checkpoints' / 'step-00000002'})" in err and "--resume" in err
    assert [p.name for p in (output_dir / "checkpoints").iterdir()] == [
        "step-00000002"
    ]  # no temp folder left
    assert ckpt.is_complete(output_dir / "checkpoints" / "step-00000002")


def test_disk_full_while_writing_best_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    from .helpers import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))

    def full_disk(tensors, path, *args, **kwargs):
        raise SafetensorError(SAFETENSORS_ENOSPC)

    monkeypatch.setattr(early_stopping, "save_file", full_disk)
    with pytest.raises(ckpt.CheckpointWriteError) as failed:
        save_best(model, tmp_path / "best", 3, 1.0)
    message = str(failed.value)
    assert "\n" not in message and f"Could not write {tmp_path / 'best'}: No space left on device" in message
    assert "none written yet" in message
    assert list(tmp_path.iterdir()) == []  # the temp folder is removed


def test_other_safetensors_errors_are_not_disk_errors(tmp_path) -> None:
    with pytest.raises(SafetensorError, match="HeaderTooLarge"):
        with ckpt.writing(tmp_path / ".tmp-x", tmp_path / "x", tmp_path / "checkpoints"):
            raise SafetensorError("Error while deserializing header: HeaderTooLarge")


# ------------------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize(("value", "message"), [(math.nan, "NaN or infinite values"), (1e30, "the loss on")])
def test_eval_of_a_broken_adapter_exits_1(tiny_run_inputs, tmp_path, capsys, value, message) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"])
    model = get_peft_model(
        base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.fill_(value)
    model.save_pretrained(tmp_path / "adapter")
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(3))
    code = main(["eval", "--adapter", str(tmp_path / "adapter"), "--dataset", str(data), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and message in captured.err and "loss nan" not in captured.out
