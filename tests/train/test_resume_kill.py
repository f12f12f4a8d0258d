"""SIGKILL at a random moment, resume, and end with exactly the adapter of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import torch

from lorakit.train.config import load_config
from lorakit.train.loop import train
from lorakit.train.metrics import read_metrics

from .helpers import adapter_tensors, tiny_run_flags
from .subprocess_utils import child_env, run_checked, train_command


def _wait_for_step(metrics_path, step: int, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(metrics_path)):
            return
        time.sleep(0.002)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_run_inputs, tmp_path) -> None:
    common = dict(
        max_steps=14, save_steps=3, eval_steps=4, lora_dropout=0.1, micro_batch_size=4, max_seq_length=128
    )
    reference = train(load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "reference", **common)))

    flags = tiny_run_flags(tiny_run_inputs, tmp_path / "killed", **common)
    kill_step, extra_delay = random.randint(2, 11), random.uniform(0.0, 0.03)
    process = subprocess.Popen(
        train_command(flags), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _wait_for_step(tmp_path / "killed" / "metrics.jsonl", kill_step, process)
    time.sleep(extra_delay)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    context = f"killed after step {kill_step} (+{extra_delay:.3f} s)"
    assert process.returncode == -signal.SIGKILL, (
        f"run ended before the kill ({context}): {process.stderr.read()[-2000:]}"
    )
    assert not (tmp_path / "killed" / "adapter").exists(), context

    run_checked(train_command(flags, "--resume"))
    expected, resumed = (
        adapter_tensors(reference.adapter_dir),
        adapter_tensors(tmp_path / "killed" / "adapter"),
    )
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), f"{key} differs; {context}"
    records = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 15)), context
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 4, 8, 12, 14], context
