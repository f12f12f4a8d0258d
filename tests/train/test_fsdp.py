"""FSDP2 (``distributed: fsdp``) with 2 CPU processes (gloo): the same adapter as 1 process with twice the batch,
checkpoints with whole tensors that resume bit-exactly (also after kill -9), and files PEFT loads."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
import torch

from lorakit.train.config import ConfigError, config_from_dict, load_config
from lorakit.train.loop import train
from lorakit.train.metrics import read_metrics

from .helpers import adapter_tensors, tiny_llama, tiny_run_flags
from .subprocess_utils import child_env, run_checked, torchrun_command
from .test_resume_kill import _wait_for_step

COMMON = dict(max_steps=4, save_steps=2, eval_steps=2, gradient_accumulation_steps=2)


def _assert_close_adapters(ours: dict, reference: dict, atol: float) -> None:
    assert ours.keys() == reference.keys()
    assert any(t.abs().sum() > 0 for k, t in reference.items() if "lora_B" in k)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=atol)


@pytest.mark.parametrize("dora", [False, True])
def test_two_sharded_processes_equal_one_with_double_batch(tiny_run_inputs, tmp_path, dora) -> None:
    extra = dict(COMMON, use_dora=dora)
    flags = tiny_run_flags(
        tiny_run_inputs, tmp_path / "fsdp", micro_batch_size=1, distributed="fsdp", **extra
    )
    run_checked(torchrun_command(2, flags), timeout=240)
    single = train(
        load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "single", micro_batch_size=2, **extra))
    )
    sharded = adapter_tensors(tmp_path / "fsdp" / "adapter")
    _assert_close_adapters(sharded, adapter_tensors(single.adapter_dir), atol=1e-5)
    records = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    reference = read_metrics(tmp_path / "single" / "metrics.jsonl")
    for ours, theirs in zip(
        [r for r in records if "loss" in r], [r for r in reference if "loss" in r], strict=True
    ):
        assert abs(ours["loss"] - theirs["loss"]) < 1e-5
    for ours, theirs in zip(
        [r for r in records if "eval_loss" in r], [r for r in reference if "eval_loss" in r], strict=True
    ):
        assert (
            ours["eval_tokens"] == theirs["eval_tokens"]
            and abs(ours["eval_loss"] - theirs["eval_loss"]) < 1e-5
        )
    # checkpoints hold whole tensors: the step-2 trainable parameters have the model's full shapes
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step-00000004" / "trainable.safetensors"))
    single_saved = load_file(
        str(tmp_path / "single" / "checkpoints" / "step-00000004" / "trainable.safetensors")
    )
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in single_saved.items()}
    if not dora:  # the adapter loads in PEFT
        import peft

        model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "fsdp" / "adapter"))
        assert model.active_peft_config.r == 4


def test_sharded_resume_and_kill_minus_9_give_the_uninterrupted_adapter(tiny_run_inputs, tmp_path) -> None:
    common = dict(
        max_steps=8, save_steps=2, save_total_limit=10, eval_steps=4, lora_dropout=0.1, micro_batch_size=2
    )
    flags = tiny_run_flags(tiny_run_inputs, tmp_path / "full", distributed="fsdp", **common)
    run_checked(torchrun_command(2, flags), timeout=240)
    uninterrupted = adapter_tensors(tmp_path / "full" / "adapter")

    # resume from a copied step-4 checkpoint
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step-00000004", resumed_dir / "checkpoints" / "step-00000004"
    )
    run_checked(torchrun_command(2, {**flags, "output_dir": str(resumed_dir)}, "--resume"), timeout=240)
    resumed = adapter_tensors(resumed_dir / "adapter")
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted)

    # kill -9 the whole torchrun process group after step 5, then resume
    killed = {**flags, "output_dir": str(tmp_path / "killed")}
    process = subprocess.Popen(
        torchrun_command(2, killed),
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_step(tmp_path / "killed" / "metrics.jsonl", 5, process, timeout=180)
    # torchrun starts each worker in its own session: kill -9 the workers, then the launcher
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    for pid in [*map(int, workers), process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "adapter").exists()
    run_checked(torchrun_command(2, killed, "--resume"), timeout=240)
    after_kill = adapter_tensors(tmp_path / "killed" / "adapter")
    assert all(torch.equal(after_kill[key], uninterrupted[key]) for key in uninterrupted)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"distributed": "fsdp", "method": "adalora"}, "adalora"),
        ({"distributed": "fsdp", "precision": "fp16"}, "bf16"),
        ({"distributed": "zero3"}, "ddp, fsdp"),
    ],
)
def test_unsupported_fsdp_combinations_are_config_errors(values, message) -> None:
    from lorakit.train.distributed import Distributed
    from lorakit.train.fsdp import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(config_from_dict(values), Distributed())


def test_sharded_qlora_equals_one_process_and_halves_the_base(tiny_run_inputs, tmp_path) -> None:
    """The 4-bit NF4 base shards too (lorakit.quant.make_shardable): same adapter as one process within 1e-5,
    and each rank holds about half of the frozen weight bytes (the log line says how much)."""
    extra = dict(COMMON, load_in_4bit=True, compute_dtype="fp32")
    flags = tiny_run_flags(
        tiny_run_inputs, tmp_path / "fsdp", micro_batch_size=1, distributed="fsdp", **extra
    )
    result = run_checked(torchrun_command(2, flags), timeout=240)
    single = train(
        load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "single", micro_batch_size=2, **extra))
    )
    _assert_close_adapters(
        adapter_tensors(tmp_path / "fsdp" / "adapter"), adapter_tensors(single.adapter_dir), atol=1e-5
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("fsdp:"))
    share = float(line.rsplit("(", 1)[1].rstrip("%)")) / 100
    assert 0.45 < share < 0.6, line  # the tiny model's replicated buffers and padding keep it above 1/2
