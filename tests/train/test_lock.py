"""One run per output folder: a second run is refused naming the holder; the lock never outlives it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from lorakit.cli import main
from lorakit.train import lock as lock_module
from lorakit.train.config import load_config
from lorakit.train.distributed import Distributed
from lorakit.train.lock import OutputDirError, OutputDirLocked, OutputLock, hold_output_dir, read_holder
from lorakit.train.loop import TrainingDiverged, train

from .helpers import tiny_run_flags
from .subprocess_utils import flag_list, run_forked_ranks

# A holder in another process: lock.py loaded by path (standard library only, starts in a blink).
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
lock.OutputLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path / 'run'``'s lock; killed with SIGKILL at the end if still alive."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, lock_module.__file__, str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "locked"
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


def _refuse_model_loading(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the output folder is unusable")

    monkeypatch.setattr("lorakit.train.loop.load_base", never)


def test_second_run_is_refused_with_the_holders_pid_until_it_is_killed(
    holder, tiny_run_inputs, tmp_path, capsys, monkeypatch
) -> None:
    flags = tiny_run_flags(tiny_run_inputs, tmp_path / "run", max_steps=2)
    with monkeypatch.context() as patch:
        _refuse_model_loading(patch)
        assert main(["train", *flag_list(flags)]) == 1
        assert main(["train", *flag_list(flags), "--resume"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lorakit train")]
    assert len(lines) == 2 and all(
        f"in use by another lorakit train run (pid {holder.pid}" in x for x in lines
    )
    assert read_holder(tmp_path / "run")["pid"] == holder.pid

    os.kill(holder.pid, signal.SIGKILL)  # the kernel releases the lock with the process
    holder.wait()
    assert main(["train", *flag_list(flags)]) == 0


def test_lock_is_released_after_a_normal_end_and_after_an_exception(tiny_run_inputs, tmp_path) -> None:
    train(load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "ok", max_steps=1)))
    config = load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "failed", max_steps=1))
    config.learning_rate = float("inf")
    with pytest.raises(TrainingDiverged):
        train(config)
    for run in ("ok", "failed"):
        with OutputLock(tmp_path / run) as taken:
            assert taken.held and read_holder(tmp_path / run)["pid"] == os.getpid()
        assert read_holder(tmp_path / run) == {}  # released: the holder's details are cleared


def test_in_process_second_lock_is_refused_and_not_reentrant(tmp_path) -> None:
    with OutputLock(tmp_path / "run"):
        with pytest.raises(OutputDirLocked, match=f"pid {os.getpid()}, started "):
            OutputLock(tmp_path / "run").acquire()
    OutputLock(tmp_path / "run").acquire()  # free again


def test_only_rank_0_takes_the_lock(holder, tmp_path) -> None:
    """The other ranks of a torchrun job never touch it (here: one process playing rank 1 alone)."""
    with hold_output_dir(tmp_path / "run", Distributed(rank=1, world_size=1)) as lock:
        assert not lock.held
    with pytest.raises(OutputDirLocked), hold_output_dir(tmp_path / "run", Distributed()):
        pass


def test_unusable_output_dir_is_one_line_before_the_model_loads(
    tiny_run_inputs, tmp_path, capsys, monkeypatch
) -> None:
    _refuse_model_loading(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    cases = {
        tmp_path / "file": "is a file, not a folder",
        tmp_path / "file" / "run": f"'{tmp_path / 'file'}' is a file, not a folder",
    }
    for output_dir, message in cases.items():
        assert main(["train", *flag_list(tiny_run_flags(tiny_run_inputs, output_dir))]) == 1
        [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("lorakit train")]
        assert message in line and "--output_dir" in line

    def read_only(*args, **kwargs):  # tests run as root: simulate a read-only mount
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(lock_module.os, "open", read_only)
    with pytest.raises(OutputDirError, match="cannot write to output_dir .*Read-only file system"):
        train(load_config(None, tiny_run_flags(tiny_run_inputs, tmp_path / "ro")))


def test_every_rank_stops_when_rank_0_cannot_lock(holder, tmp_path) -> None:
    def take(output_dir):
        def run(context):
            with hold_output_dir(output_dir, context):
                return "started"

        return run

    (rank0, rank1) = run_forked_ranks(take(tmp_path / "run"), 2, tmp_path / "busy")
    assert rank0[0] == "OutputDirLocked" and f"pid {holder.pid}" in rank0[1]
    assert rank1 == [
        "OutputDirError",
        f"rank 0 could not lock output_dir '{tmp_path / 'run'}' (see its message).",
    ]
    assert run_forked_ranks(take(tmp_path / "free"), 2, tmp_path / "free") == ["started", "started"]
