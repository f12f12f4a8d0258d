"""One run per output folder: an exclusive lock on ``<output_dir>/.lorakit.lock``, held for the whole run.

Two ``lorakit train`` runs writing into one folder corrupt each other (interleaved metrics, one run
deleting the other's temporary checkpoint, a ``--resume`` replacing files under a live run). So before
the model loads, the run takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the lock file and writes its pid, host
and start time into it. A second run finds the lock held and stops with a one-line message naming the
holder. The kernel releases a ``flock`` when the holder's file descriptor closes, including when the process
dies (``kill -9``, a crash, a lost node), so a lock is never stale: the file stays, its content is only
informative and overwritten by the next holder. (A child forked without ``exec`` shares the descriptor and
so the lock until it exits; the descriptor is close-on-exec.) The file is never deleted (deleting a lock file lets two
processes lock two different files of the same name).

Under ``torchrun`` only rank 0 takes the lock (the ranks of one run share the folder) and all ranks learn
its outcome through one all-reduce, so they stop together. ``flock`` works on local file systems and NFSv4;
a multi-node run keeps its folder on a shared file system (see docs/training.md).

The same step checks that the folder can be used at all: a file in its place, a parent that is a file, or
no permission to write (read-only mount, EACCES) is a one-line :class:`OutputDirError` before the model loads.

This module imports only the standard library (torch only inside :func:`hold_output_dir`), so a process
can take a lock cheaply, e.g. in tests.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".lorakit.lock"


class OutputDirError(RuntimeError):
    """The output folder cannot be used by this run; the message says why and what to do."""


class OutputDirLocked(OutputDirError):
    """Another live process holds the output folder's lock."""


def _describe_holder(info: dict[str, Any]) -> str:
    if "pid" not in info:
        return "another process (it is just starting)"
    where = f" on {info['host']}" if info.get("host") and info.get("host") != socket.gethostname() else ""
    since = f", started {info['started']}" if info.get("started") else ""
    return f"pid {info['pid']}{where}{since}"


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` (and parents); a one-line :class:`OutputDirError` when that is impossible."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(
            f"output_dir '{output_dir}' is a file, not a folder; choose another --output_dir or move the file."
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in output_dir.parents if p.exists() and not p.is_dir()), output_dir)
        raise OutputDirError(
            f"cannot create output_dir '{output_dir}': '{blocker}' is a file, not a folder; "
            "choose another --output_dir."
        ) from None
    except OSError as error:
        raise OutputDirError(_unwritable(output_dir, error)) from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise OutputDirError(_unwritable(output_dir, OSError(errno.EACCES, os.strerror(errno.EACCES))))


def _unwritable(output_dir: Path, error: OSError) -> str:
    return (
        f"cannot write to output_dir '{output_dir}': {error.strerror or error}; "
        "choose a writable --output_dir (or fix its permissions / free the mount)."
    )


class OutputLock:
    """The exclusive lock of one output folder (see the module docstring); not re-entrant."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Create the folder if needed and lock it; :class:`OutputDirLocked` naming the holder when taken."""
        prepare_output_dir(self.output_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise OutputDirError(_unwritable(self.output_dir, error)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(_read_info(fd))
            os.close(fd)
            raise OutputDirLocked(
                f"output_dir '{self.output_dir}' is in use by another lorakit train run ({holder}); "
                "wait for it to finish, stop it, or use another --output_dir."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._write_info()

    def _write_info(self) -> None:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(info).encode(), 0)
        except OSError as error:  # a folder that takes no byte cannot hold checkpoints either
            self.release()
            raise OutputDirError(_unwritable(self.output_dir, error)) from None

    def release(self) -> None:
        """Clear the holder's details and unlock (closing the descriptor also unlocks)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_info(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def read_holder(output_dir: str | Path) -> dict[str, Any]:
    """The holder details written in ``output_dir``'s lock file ({} when none or unreadable)."""
    try:
        fd = os.open(Path(output_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _read_info(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_output_dir(output_dir: str | Path, context: Any) -> Iterator[OutputLock]:
    """Hold ``output_dir``'s lock for the block: rank 0 takes it, every rank stops when it could not.

    ``context``: a :class:`lorakit.train.distributed.Distributed`. Raises :class:`OutputDirError`.
    """
    lock = OutputLock(output_dir)
    failure: OutputDirError | None = None
    if context.is_main:
        try:
            lock.acquire()
        except OutputDirError as error:
            failure = error
    if context.enabled:
        import torch

        from lorakit.train.distributed import all_reduce_sum

        flag = torch.tensor([1.0 if failure else 0.0], device=context.device)
        if all_reduce_sum(context, flag).item() and failure is None:
            failure = OutputDirError(f"rank 0 could not lock output_dir '{output_dir}' (see its message).")
    if failure is not None:
        raise failure
    try:
        yield lock
    finally:
        lock.release()
