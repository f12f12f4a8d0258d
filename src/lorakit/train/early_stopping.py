"""Early stopping on the held-out loss, and the best adapter kept in ``<output_dir>/best/``.

The rule is that of transformers' ``EarlyStoppingCallback``: an evaluation during training is an
improvement when ``eval_loss < best_loss - early_stopping_threshold``; after ``early_stopping_patience``
evaluations in a row without one, the run stops. The evaluation at step 0 (the untrained adapter, which
leaves the base model unchanged) is the baseline shown in the log, not a candidate: the best adapter is
always a trained one. A NaN or infinite held-out loss never improves.

Whenever the run has held-out data, rank 0 writes ``best/`` at every improvement (also with early
stopping off, so that a run that later diverges, see :mod:`lorakit.train.divergence`, always keeps its
best adapter): ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format),
``trainable.safetensors`` (every trainable parameter by name) and ``best.json`` (step, held-out loss).
It sits outside ``checkpoints/``, so ``save_total_limit`` never prunes it, and is replaced atomically
(:func:`lorakit.train.checkpoint.replace_folder`); non-finite parameters are never written there.
With ``early_stopping_patience`` or ``load_best_model_at_end`` the best parameters are also loaded back
into the model at the end, after the final checkpoint is written: the final ``adapter/`` (bit-identical
to ``best/``), the summary and the before/after samples are the best adapter's, while the final
checkpoint keeps the last state for ``--resume``.

Resume needs no extra saved state: the early-stopping counters are replayed from the eval lines of
``metrics.jsonl``, which resume truncates to the checkpoint's step. A ``best/`` written after that
checkpoint (its step beyond the resume step) belongs to the abandoned continuation: it is replaced by the
replayed best, copied from that step's checkpoint when it is still there, or else dropped, and the resumed
run writes ``best/`` again at its next improvement.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.fsdp import adapter_save_kwargs, gathered_state, is_sharded
from lorakit.train.metrics import read_metrics

BEST_DIR = "best"
BEST_FILE = "best.json"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class EarlyStopping:
    """The counters: best loss and step so far, evaluations since the last improvement."""

    patience: int | None = None
    threshold: float = 0.0
    best_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Count one evaluation; True when it is the new best."""
        if math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss - self.threshold):
            self.best_loss, self.best_step, self.evals_without_improvement = loss, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience


def save_best(
    model: nn.Module, folder: Path, step: int, loss: float, gathered: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``best/`` (adapter, trainable parameters, ``best.json``) in a temp folder, then rename.

    Refuses non-finite parameters; a full disk is a one-line :class:`~lorakit.train.checkpoint.CheckpointWriteError`.
    ``gathered``: the trainable parameters as whole tensors, for a sharded (FSDP) model.
    """
    temp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    checkpoints = folder.parent / "checkpoints"
    trainable = ckpt.trainable_state(model) if gathered is None else gathered
    ckpt.check_finite(trainable, folder, checkpoints)
    with ckpt.writing(temp, folder, checkpoints):
        shutil.rmtree(temp, ignore_errors=True)
        model.save_pretrained(str(temp), **adapter_save_kwargs(gathered))
        save_file(trainable, str(temp / TRAINABLE_FILE))
        ckpt.write_json(temp / BEST_FILE, {"step": step, "eval_loss": loss})
        ckpt.replace_folder(temp, folder)


def copy_best(checkpoint: Path, folder: Path, step: int, loss: float) -> None:
    """Write ``best/`` from a complete checkpoint of ``step`` (its adapter and trainable parameters)."""
    temp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    checkpoints = folder.parent / "checkpoints"
    with ckpt.writing(temp, folder, checkpoints):
        shutil.rmtree(temp, ignore_errors=True)
        shutil.copytree(checkpoint / "adapter", temp)
        shutil.copy2(checkpoint / TRAINABLE_FILE, temp / TRAINABLE_FILE)
        ckpt.write_json(temp / BEST_FILE, {"step": step, "eval_loss": loss})
        ckpt.replace_folder(temp, folder)


def read_best(folder: Path) -> dict[str, Any] | None:
    """``best.json`` of a complete ``best/`` folder, or None."""
    try:
        info = json.loads((folder / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if (folder / TRAINABLE_FILE).is_file() else None


class BestAdapter:
    """Early stopping plus the ``best/`` folder for one run.

    ``enabled`` (early stopping or ``load_best_model_at_end``): stopping, restoring the best at the end and
    the summary keys. ``keeps``: ``best/`` is written, which is the case whenever there is held-out data.
    """

    def __init__(
        self,
        output_dir: Path,
        *,
        patience: int | None = None,
        threshold: float = 0.0,
        keep_best: bool = False,
        is_main: bool = True,
    ) -> None:
        self.enabled = keep_best or patience is not None
        self.keeps = True  # until start() finds no held-out data
        self.folder = output_dir / BEST_DIR
        self.stopping = EarlyStopping(patience, threshold)
        self.is_main = is_main
        self.restored: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: TrainConfig, output_dir: Path, is_main: bool) -> BestAdapter:
        return cls(
            output_dir,
            patience=config.early_stopping_patience,
            threshold=config.early_stopping_threshold,
            keep_best=config.load_best_model_at_end,
            is_main=is_main,
        )

    def start(
        self,
        has_eval_data: bool,
        metrics_path: Path,
        resume_step: int | None,
        say: Callable[[str], None] = print,
    ) -> None:
        """Before the first step. A fresh run (``resume_step`` None) drops an old ``best/``; a run resumed
        from the checkpoint of ``resume_step`` replays the eval lines of ``metrics_path`` up to that step
        (other ranks may read the file before rank 0 has truncated it, hence the filter on the step) and
        then makes ``best/`` agree with the replayed counters (:meth:`_reconcile`)."""
        if not has_eval_data and not self.enabled:
            self.keeps = False
            return
        if not has_eval_data:
            raise ConfigError(
                "early_stopping_patience / load_best_model_at_end need held-out data: set eval_dataset, "
                "eval_dataset_split or eval_split > 0."
            )
        if self.is_main:
            for stale in self.folder.parent.glob(f".tmp-{BEST_DIR}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            if resume_step is None:
                shutil.rmtree(self.folder, ignore_errors=True)
        if resume_step is not None:
            for record in read_metrics(metrics_path):
                if record.get("eval_loss") is not None and 0 < record["step"] <= resume_step:
                    self.stopping.update(record["step"], record["eval_loss"])
            if self.is_main:
                self._reconcile(resume_step, say)

    def _reconcile(self, resume_step: int, say: Callable[[str], None]) -> None:
        """Rank 0, on resume: drop a ``best/`` written after the checkpoint of ``resume_step``, and rebuild
        it from the checkpoint of the replayed best step when that checkpoint is still there."""
        info = read_best(self.folder)
        if info is not None and info["step"] <= resume_step:
            return
        stale = f" (step {info['step']}, after the resume point)" if info is not None else ""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        step, loss = self.stopping.best_step, self.stopping.best_loss
        if step is None:
            if stale:
                say(f"resume: removed {self.folder}{stale}")
            return
        source = ckpt.checkpoint_dir(self.folder.parent / "checkpoints", step)
        if ckpt.is_complete(source):
            copy_best(source, self.folder, step, loss)
            say(f"resume: {self.folder} rebuilt from {source} (step {step}, held-out loss {loss:.4f})")
        elif stale:
            say(
                f"resume: removed {self.folder}{stale}; the checkpoint of the best step so far ({step}) "
                "is gone, so best/ is written again at the next improvement"
            )

    def observe(self, step: int, loss: float | None, model: nn.Module) -> bool:
        """Count the evaluation at ``step``; on a new best, rank 0 writes ``best/``."""
        if not self.keeps or loss is None or step == 0:
            return False
        improved = self.stopping.update(step, loss)
        gathered = gathered_state(model) if improved else None  # every rank, under FSDP
        if improved and self.is_main:
            save_best(model, self.folder, step, loss, gathered)
        return improved

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.stopping.should_stop

    def stop_message(self) -> str:
        stopping = self.stopping
        return (
            f"early stopping: no held-out improvement in {stopping.patience} evaluation(s); "
            f"best loss {stopping.best_loss:.4f} at step {stopping.best_step}"
        )

    def describe(self) -> str | None:
        """``best/`` for messages: its path, step and held-out loss as written, or None when there is none."""
        info = read_best(self.folder) if self.keeps else None
        if info is None:
            return None
        return f"{self.folder} (step {info['step']}, held-out loss {info['eval_loss']:.4f})"

    def restore(self, model: nn.Module, say: Callable[[str], None] = print) -> dict[str, Any] | None:
        """Rank 0 (every rank under FSDP): load ``best/``'s trainable parameters into ``model``; returns
        ``best.json`` or None.

        None with a best step on record happens after a resume that found the best step's checkpoint
        pruned (:meth:`_reconcile`) and no later improvement: the model keeps its last state, and says so.
        """
        if not (self.enabled and (self.is_main or is_sharded(model))):
            return None
        info = read_best(self.folder)
        if info is not None:
            ckpt.load_trainable_state(model, load_file(str(self.folder / TRAINABLE_FILE)))
        elif self.stopping.best_step is not None:
            say(
                f"note: the best adapter (step {self.stopping.best_step}) is no longer on disk; "
                "the final adapter is the last state"
            )
        self.restored = info
        return info

    def summary(self) -> dict[str, Any]:
        """Summary keys: ``best_step``, ``best_eval_loss``, ``stopped_early`` (empty when off)."""
        if not self.enabled:
            return {}
        info = self.restored or {"step": self.stopping.best_step, "eval_loss": self.stopping.best_loss}
        return {
            "best_step": info["step"],
            "best_eval_loss": info["eval_loss"],
            "stopped_early": self.stopping.should_stop,
        }
