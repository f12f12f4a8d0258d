"""Stopping on SIGTERM and Ctrl-C (SIGINT) without losing work: finish the step, save, say how to resume.

While the training loop runs, the first SIGTERM or SIGINT only sets a flag. At the end of the current
optimizer step (after its evaluation and checkpoint, if due) the run writes a checkpoint at that step
(unless it just wrote one), and stops with :class:`TrainingInterrupted`: the command line prints where the
checkpoint is and the exact command that resumes it (``lorakit train <output_dir>/config.yaml --resume``),
and exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as a process killed by that signal would.
The final checkpoint, written at the start of the end-of-run work, is such a stop point too.

Aborting at once, with a one-line message and no traceback (:class:`TrainingAborted`, a
``KeyboardInterrupt``, exit ``128 + signal``): the same signal a second time (a second Ctrl-C) more than
:data:`REPEAT_GRACE_S` after the first, and any signal outside the loop (model loading, the first
evaluation, the samples after the final checkpoint), where nothing new would be saved. A repeat within
the grace period is ignored because ``torchrun`` forwards the terminal's Ctrl-C to ranks that already
received it from the terminal.

Under ``torchrun`` a signal may reach some ranks only, or at different moments. Every rank therefore
all-reduces its flag at each stop point (:meth:`StopSignals.agreed`, one tiny MAX all-reduce per step) and
all ranks stop at the same step, writing one consistent checkpoint (torchrun waits 30 s before it kills
its workers with SIGKILL; a step plus a checkpoint must fit in that time).

Handlers are installed only in the main thread (``signal.signal`` works nowhere else) and the previous
ones are restored afterwards, so calling :func:`lorakit.train.loop.train` from a notebook or a test leaves
the process as it was. A signal that is ignored (``SIG_IGN``, as for SIGINT of a job a script starts with
``&``, or under ``nohup``) is left ignored: the run does not start reacting to it.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_GRACE_S = 1.0


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum``: 128 + signum."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class TrainingInterrupted(Exception):
    """A graceful stop: the current step was finished and saved; the message says how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = exit_code(signum)


class TrainingAborted(KeyboardInterrupt):
    """An immediate stop by a signal (second Ctrl-C, or outside the training loop); nothing new saved."""

    def __init__(self, signum: int, during: str) -> None:
        super().__init__(
            f"stopped by {signal_name(signum)} {during}; nothing was saved since the last checkpoint "
            "(continue with --resume)."
        )
        self.signum = signum
        self.exit_code = exit_code(signum)


def _notice(text: str) -> None:
    """Write to stderr from a signal handler: unbuffered (print could re-enter a busy stream), rank 0 only."""
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return
    try:
        os.write(2, f"\nlorakit train: {text}\n".encode())
    except OSError:
        pass


class StopSignals:
    """SIGTERM/SIGINT handlers for one run (a context manager) and the stop flag they set.

    ``graceful`` is True while the loop can stop at a step boundary; otherwise a signal aborts at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.graceful = False
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                if signal.getsignal(signum) is signal.SIG_IGN:
                    continue  # ignored on purpose by whoever started us: keep it so
                self._previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            # None: the previous handler was not installed from Python; signal.signal refuses None.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def handle(self, signum: int, frame: Any = None) -> None:
        """The handler: note the first signal in the loop; abort on a late repeat or outside the loop."""
        name = signal_name(signum)
        if not self.graceful:
            raise TrainingAborted(signum, "outside the training steps")
        if self.received is None:
            self.received, self._first_at = signum, time.monotonic()
            _notice(
                f"{name} received: finishing this step, then writing a checkpoint and stopping "
                "(press Ctrl-C again to stop at once, without saving)."
            )
        elif signum == self.received and time.monotonic() - self._first_at > REPEAT_GRACE_S:
            raise TrainingAborted(signum, "a second time, during a step")

    def agreed(self, context: Any) -> int | None:
        """The signal to stop with, the same on every rank (the largest number any rank received), or None."""
        if not context.enabled:
            return self.received
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=context.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def resume_command(output_dir: str | Path, world_size: int = 1) -> str:
    """The command that continues a run from its newest checkpoint (its resolved ``config.yaml``)."""
    command = f"lorakit train {shlex.quote(str(Path(output_dir) / 'config.yaml'))} --resume"
    if world_size > 1:
        command += f"   (under torchrun, with the same {world_size} processes)"
    return command


def stop_point(trainer: Any, *, last: bool = False) -> None:
    """At a step boundary of :class:`lorakit.train.loop.Trainer`: when any rank received a stop signal,
    save a checkpoint at the current step (unless one exists) and raise :class:`TrainingInterrupted`.

    ``last``: the final stop point (after the final checkpoint); later signals abort at once.
    """
    signum = trainer.stopper.agreed(trainer.context)
    if last:
        trainer.stopper.graceful = False
    if signum is None:
        return
    step = trainer.state.step
    if trainer.state.last_checkpoint != str(trainer.checkpoint_root / f"step-{step:08d}"):
        trainer.save()
    trainer.stopper.graceful = False  # from here on a further signal aborts at once
    raise TrainingInterrupted(
        signum,
        f"stopped by {signal_name(signum)} after step {step} of {trainer.plan.total_steps}; "
        f"checkpoint {trainer.state.last_checkpoint}. Resume with: "
        f"{resume_command(trainer.output_dir, trainer.context.world_size)}",
    )
