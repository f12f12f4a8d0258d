"""torchrun with 2 CPU processes (gloo): same adapter as 1 process with twice the batch; resume works."""

from __future__ import annotations

import shutil

import torch

from lorakit.train.config import load_config
from lorakit.train.loop import train
from lorakit.train.metrics import read_metrics

from .helpers import adapter_tensors, tiny_run_flags
from .subprocess_utils import run_checked, torchrun_command


def test_two_processes_equal_one_with_double_batch_and_resume(tiny_run_inputs, tmp_path) -> None:
    common = dict(max_steps=4, save_steps=2, eval_steps=2, gradient_accumulation_steps=2)
    flags = tiny_run_flags(tiny_run_inputs, tmp_path / "ddp", micro_batch_size=1, **common)
    run_checked(torchrun_command(2, flags), timeout=180)
    single = train(
        load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "single", micro_batch_size=2, **common))
    )

    ddp, one = adapter_tensors(tmp_path / "ddp" / "adapter"), adapter_tensors(single.adapter_dir)
    assert any(t.abs().sum() > 0 for k, t in one.items() if "lora_B" in k)
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=1e-5)
    # Only rank 0 writes: one line per step, and the evals saw the whole held-out set.
    records = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    single_evals = [r for r in read_metrics(tmp_path / "single" / "metrics.jsonl") if "eval_loss" in r]
    ddp_evals = [r for r in records if "eval_loss" in r]
    assert [r["eval_tokens"] for r in ddp_evals] == [r["eval_tokens"] for r in single_evals]
    for ours, reference in zip(ddp_evals, single_evals, strict=True):
        assert abs(ours["eval_loss"] - reference["eval_loss"]) < 1e-5

    # Resume under torchrun from the step-2 checkpoint: bit-identical to the uninterrupted 2-process run.
    resumed_dir = tmp_path / "ddp-resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "ddp" / "checkpoints" / "step-00000002", resumed_dir / "checkpoints" / "step-00000002"
    )
    resumed_flags = {**flags, "output_dir": str(resumed_dir)}
    run_checked(torchrun_command(2, resumed_flags, "--resume"), timeout=180)
    resumed = adapter_tensors(resumed_dir / "adapter")
    assert all(torch.equal(resumed[key], ddp[key]) for key in ddp)


def test_progress_bars_are_off_inside_the_block_and_restored_after() -> None:
    from transformers.utils import logging as hf_logging

    from lorakit.train.distributed import progress_bars

    original = hf_logging.is_progress_bar_enabled()
    try:
        for before in (True, False):
            (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()
            for enabled in (True, False):  # False: a rank other than 0 loading the model
                with progress_bars(enabled=enabled):
                    assert hf_logging.is_progress_bar_enabled() == (before and enabled)  # never turned on
                assert hf_logging.is_progress_bar_enabled() == before
    finally:
        (hf_logging.enable_progress_bar if original else hf_logging.disable_progress_bar)()
