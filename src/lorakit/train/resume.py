"""Checkpoint glue of the trainer: what a run saves at step N, how it resumes, when it refuses to.

:class:`CheckpointMixin` is mixed into :class:`lorakit.train.loop.Trainer`; it reads the trainer's model,
optimizer, scaler, plan, state and distributed context. Files: :mod:`lorakit.train.checkpoint`; what a
resumed run must share with the checkpoint's run: :mod:`lorakit.train.fingerprint`.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.train import checkpoint as ckpt
from lorakit.train.adapters import load_method_state, method_state
from lorakit.train.distributed import barrier, gather_tensors
from lorakit.train.fingerprint import allowed_changes, check_resume, run_fingerprint
from lorakit.train.metrics import read_metrics, truncate_metrics
from lorakit.train.rng import capture_rng_state, restore_rng_state


@dataclass
class RunState:
    """What changes from step to step (and is saved in ``trainer_state.json``)."""

    step: int = 0
    trained_tokens: int = 0
    train_time_s: float = 0.0
    eval_loss_start: float | None = None
    eval_loss_end: float | None = None
    last_checkpoint: str | None = None


class CheckpointMixin:
    """save / resume / output-folder checks for the trainer (see module docstring)."""

    def save(self) -> None:
        rng = gather_tensors(self.context, capture_rng_state())
        if self.context.is_main:
            state = {
                **dataclasses.asdict(self.state),
                "plan": self.plan.as_dict(),
                "world_size": self.context.world_size,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "lr_scheduler": {"kind": self.config.lr_scheduler, "base_lrs": self.base_lrs},
                "config": dataclasses.asdict(self.config),
                "fingerprint": self.fingerprint,
                "metrics_records": len(read_metrics(self.metrics.path)),
            }
            folder = ckpt.save_checkpoint(
                self.checkpoint_root,
                self.state.step,
                model=self.model,
                optimizer=self.optimizer,
                trainer_state=state,
                rng_states=rng,
                keep=self.config.save_total_limit,
                method_state=method_state(self.model),
            )
            self.say(f"step {self.state.step}: checkpoint {folder}")
        self.state.last_checkpoint = str(self.checkpoint_root / f"step-{self.state.step:08d}")
        barrier(self.context)

    def resume(self) -> bool:
        """Restore the newest complete checkpoint; False when there is none."""
        folder = ckpt.latest_checkpoint(self.checkpoint_root)
        if folder is None:
            self.say(f"resume: no complete checkpoint in {self.checkpoint_root}; starting from step 0")
            return False
        saved = ckpt.read_checkpoint(folder)
        trainer_state = saved["trainer_state"]
        self._check_compatible(trainer_state, folder)
        ckpt.load_trainable_state(self.model, saved["trainable"])
        names = {id(p): n for n, p in self.model.named_parameters()}
        ckpt.optimizer_from_safetensors(
            self.optimizer, names, saved["optimizer_tensors"], saved["optimizer_index"]
        )
        load_method_state(self.model, saved["method"])
        if self.scaler is not None and trainer_state.get("scaler"):
            self.scaler.load_state_dict(trainer_state["scaler"])
        prefix = f"rank{self.context.rank}/"
        restore_rng_state({k[len(prefix) :]: v for k, v in saved["rng"].items() if k.startswith(prefix)})
        fields = {f.name for f in dataclasses.fields(RunState)}
        self.state = RunState(**{k: v for k, v in trainer_state.items() if k in fields})
        self.state.last_checkpoint = str(folder)
        if self.context.is_main:
            truncate_metrics(self.metrics.path, trainer_state.get("metrics_records", 0))
        self.say(f"resume: continuing from {folder} (step {self.state.step} of {self.plan.total_steps})")
        return True

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """What defines this run (config, token ids, base model; :mod:`lorakit.train.fingerprint`)."""
        return run_fingerprint(
            self.config, self.data.train, self.data.eval, world_size=self.context.world_size
        )

    def _check_compatible(self, trainer_state: dict[str, Any], folder: Path) -> None:
        """Refuse a checkpoint of a different run, listing every difference; older checkpoints: plan only."""
        saved = trainer_state.get("fingerprint")
        if saved is None:
            self.say(
                f"warning: {folder} was written before lorakit recorded run fingerprints; could not check that "
                "model, data and settings are unchanged (only the data plan and number of processes are)"
            )
        else:
            allowed = allowed_changes(self.config.resume_allow_changes)
            for change in check_resume(saved, self.fingerprint, allowed, folder):
                self.say(f"resume: {change} (allowed by resume_allow_changes)")
        saved_plan, world = trainer_state.get("plan", {}), trainer_state.get("world_size")
        if saved_plan != self.plan.as_dict() or world != self.context.world_size:
            raise ckpt.CheckpointError(
                f"{folder} was written by a run with plan {saved_plan} on {world} process(es); this run has "
                f"{self.plan.as_dict()} on {self.context.world_size}. Resume with the same data, batch sizes, "
                "steps and number of processes, or use a new output_dir."
            )

    def _check_output_dir(self) -> None:
        """A fresh run never silently overwrites the checkpoints of an earlier one."""
        allowed_changes(self.config.resume_allow_changes)  # a bad name fails before the model loads
        previous = ckpt.latest_checkpoint(self.checkpoint_root)
        if previous is None or self.config.resume:
            return
        if not self.config.overwrite_output_dir:
            raise ckpt.CheckpointError(
                f"{self.output_dir} already holds checkpoints of an earlier run (newest: {previous.name}). "
                "Use --resume to continue it, --output_dir DIR for a new run, or --overwrite_output_dir to start over."
            )
        barrier(self.context)
        if self.context.is_main:
            shutil.rmtree(self.checkpoint_root)
        barrier(self.context)
