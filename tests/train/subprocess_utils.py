"""Running ``lorakit train`` in child processes (plain and under torchrun) for the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def child_env() -> dict[str, str]:
    """The test's environment, with this process's thread count so float results match in-process runs."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")])),
    )
    return env


def flag_list(flags: dict[str, str]) -> list[str]:
    return [token for key, value in flags.items() for token in (f"--{key}", value)]


def train_command(flags: dict[str, str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "lorakit", "train", *flag_list(flags), *extra]


def torchrun_command(processes: int, flags: dict[str, str], *extra: str) -> list[str]:
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
    ]
    return [*launcher, "-m", "lorakit", "train", *flag_list(flags), *extra]


def run_checked(command: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(command)}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-3000:]}"
    )
    return result


def run_forked_ranks(function, world_size: int, folder: Path, timeout: float = 180) -> list:
    """``function(context)`` on ``world_size`` forked processes joined in a gloo group; their results by rank.

    Forking skips the interpreter start and imports, so collective logic is tested in about a second.
    A result that is an exception is returned as ``(type name, message)``.
    """
    import json
    import multiprocessing

    def worker(rank: int) -> None:
        import torch.distributed as dist

        # one intra-op thread: an OpenMP pool inherited through fork can deadlock the child's first parallel op
        torch.set_num_threads(1)

        from lorakit.train.distributed import Distributed

        dist.init_process_group(
            "gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=world_size
        )
        try:
            result = function(Distributed(rank=rank, world_size=world_size))
        except Exception as error:  # noqa: BLE001 - reported to the test
            result = [type(error).__name__, str(error)]
        (folder / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()

    folder.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=worker, args=(rank,)) for rank in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise AssertionError(f"rank hung for {timeout} s")
        assert process.exitcode == 0, f"rank exited with {process.exitcode}"
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world_size)]
