"""SIGTERM and Ctrl-C: finish the step, write a checkpoint, say how to resume, exit 143 / 130, no traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from lorakit.train import signals as signals_module
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.config import load_config
from lorakit.train.distributed import Distributed
from lorakit.train.loop import train
from lorakit.train.metrics import read_metrics
from lorakit.train.signals import StopSignals, TrainingAborted

from .helpers import adapter_tensors, tiny_run_flags
from .subprocess_utils import child_env, flag_list, run_checked, run_forked_ranks, train_command

# ``lorakit train`` with each optimizer step slowed by 50 ms, so that a signal surely lands mid-run.
SLOW_TRAIN = """
import sys, time
from lorakit.train import loop
step = loop.Trainer.train_step
loop.Trainer.train_step = lambda self, batches: (time.sleep(0.05), step(self, batches))[1]
from lorakit.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
COMMON = dict(max_steps=12, save_steps=5, eval_steps=4, lora_dropout=0.1)


# ------------------------------------------------------------------------------------------- handler
def test_first_signal_is_noted_a_late_repeat_aborts(monkeypatch) -> None:
    stopper = StopSignals()
    with pytest.raises(TrainingAborted) as outside:  # before the loop: nothing to finish, stop at once
        stopper.handle(signal.SIGTERM)
    assert outside.value.exit_code == 143 and stopper.received is None
    stopper.graceful = True
    stopper.handle(signal.SIGINT)
    stopper.handle(signal.SIGINT)  # within the grace period: torchrun forwarding the same Ctrl-C
    stopper.handle(signal.SIGTERM)  # another signal: still stopping at the step's end
    assert stopper.received == signal.SIGINT and stopper.agreed(Distributed()) == signal.SIGINT
    monkeypatch.setattr(signals_module, "REPEAT_GRACE_S", 0.0)
    with pytest.raises(TrainingAborted, match="SIGINT a second time") as second:
        stopper.handle(signal.SIGINT)
    assert second.value.exit_code == 130 and isinstance(second.value, KeyboardInterrupt)


def test_handlers_are_restored_after_the_run() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stopper:
        assert signal.getsignal(signal.SIGTERM) == stopper.handle
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_an_ignored_signal_stays_ignored() -> None:
    # A job a script starts with ``&`` (or nohup) has SIGINT ignored: the run must not start handling it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        term_before = signal.getsignal(signal.SIGTERM)
        with StopSignals() as stopper:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stopper.handle
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_previous_handler_not_set_from_python_is_restored_as_default(monkeypatch) -> None:
    # signal.signal returns None for a handler installed outside Python, and refuses None when restoring.
    real_signal = signal.signal
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    calls = []

    def fake_signal(signum, handler):
        calls.append((signum, handler))
        previous = real_signal(signum, handler)
        return None if signum == signal.SIGTERM else previous

    monkeypatch.setattr(signals_module.signal, "signal", fake_signal)
    try:
        with StopSignals():
            pass
        assert (signal.SIGTERM, signal.SIG_DFL) in calls
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == before[1]
    finally:
        real_signal(signal.SIGTERM, before[0])


# --------------------------------------------------------------------------------------- real runs
def test_library_train_restores_the_process_handlers(tiny_run_inputs, tmp_path, monkeypatch) -> None:
    """``lorakit.train.loop.train(config)`` from a notebook or a test: its handlers are active during the
    steps, and the caller's own SIGINT/SIGTERM handlers are back afterwards."""
    from lorakit.train import loop

    def on_term(signum, frame):  # pragma: no cover - never called
        pass

    def on_int(signum, frame):  # pragma: no cover - never called
        pass

    during = []
    step = loop.Trainer.train_step

    def recording_step(self, batches):
        during.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return step(self, batches)

    monkeypatch.setattr(loop.Trainer, "train_step", recording_step)
    previous = signal.signal(signal.SIGTERM, on_term), signal.signal(signal.SIGINT, on_int)
    try:
        flags = tiny_run_flags(tiny_run_inputs, tmp_path / "run", max_steps=2, sample_max_new_tokens=0)
        result = train(load_config(None, flags))
        assert result.summary["steps"] == 2
        assert during and all(term is not on_term and intr is not on_int for term, intr in during)
        assert signal.getsignal(signal.SIGTERM) is on_term and signal.getsignal(signal.SIGINT) is on_int
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


@pytest.fixture(scope="module")
def reference(tiny_run_inputs, tmp_path_factory):
    """The adapter of the uninterrupted run."""
    result = train(
        load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path_factory.mktemp("ref"), **COMMON))
    )
    return adapter_tensors(result.adapter_dir)


def _wait_for_step(metrics_path, step: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(metrics_path)):
            return
        time.sleep(0.005)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_the_step_and_resume_matches_uninterrupted(
    tiny_run_inputs, tmp_path, reference, signum, code
) -> None:
    output_dir = tmp_path / "run"
    flags = tiny_run_flags(tiny_run_inputs, output_dir, **COMMON)
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, "train", *flag_list(flags)],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(output_dir / "metrics.jsonl", 2, process)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    reached = max(r["step"] for r in read_metrics(output_dir / "metrics.jsonl") if "loss" in r)
    assert 2 <= reached < 12
    checkpoint = latest_checkpoint(output_dir / "checkpoints")
    assert checkpoint.name == f"step-{reached:08d}"
    assert "received: finishing this step" in stderr
    assert (
        f"lorakit train: stopped by {signum.name} after step {reached} of 12; checkpoint {checkpoint}. "
        f"Resume with: lorakit train {output_dir / 'config.yaml'} --resume" in stderr
    )
    assert not (output_dir / "adapter").exists()

    run_checked([*train_command({}), str(output_dir / "config.yaml"), "--resume"])
    resumed = adapter_tensors(output_dir / "adapter")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_ranks_agree_on_the_signal_one_of_them_received(tmp_path) -> None:
    def agreement(context):
        stopper = StopSignals()
        before = stopper.agreed(context)
        if context.rank == 1:  # e.g. `kill -TERM` of one worker
            stopper.received = signal.SIGTERM
        return [before, stopper.agreed(context)]

    assert run_forked_ranks(agreement, 2, tmp_path) == [[None, 15], [None, 15]]
