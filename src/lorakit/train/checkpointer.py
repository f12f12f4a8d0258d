"""The checkpoints of one training run: what it saves at step N, how it resumes, when it refuses to.

:class:`Checkpointer` is built before the model loads from what is fixed for the run (checkpoint folder,
metrics file, distributed context, config, where messages go); what the trainer builds later (model,
optimizer, scaler, data plan, data) is passed to each call, so it reads nothing of the trainer.
:class:`RunState` is what changes from step to step and is saved in ``trainer_state.json``. Files:
:mod:`lorakit.train.checkpoint`; what a resumed run must share with the checkpoint's run:
:mod:`lorakit.train.fingerprint`.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorakit.train import adapters
from lorakit.train import checkpoint as ckpt
from lorakit.train.distributed import Distributed, barrier, gather_tensors
from lorakit.train.fingerprint import allowed_changes, check_resume, run_fingerprint
from lorakit.train.fsdp import full_optimizer_state, full_state, is_sharded
from lorakit.train.metrics import read_metrics, truncate_metrics
from lorakit.train.rng import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lorakit.train.config import TrainConfig
    from lorakit.train.data_prep import PreparedData
    from lorakit.train.setup import Plan


@dataclass
class RunState:
    """What changes from step to step (and is saved in ``trainer_state.json``)."""

    step: int = 0
    trained_tokens: int = 0
    train_time_s: float = 0.0
    eval_loss_start: float | None = None
    eval_loss_end: float | None = None
    last_checkpoint: str | None = None


class Checkpointer:
    """Save / resume / output-folder checks for the checkpoints of one run under ``root``.

    Every rank calls :meth:`start`, :meth:`save` and :meth:`resume` (they gather RNG states and meet at
    barriers); only rank 0 writes files. ``metrics_path``: the run's ``metrics.jsonl`` (a checkpoint records
    its length, resume truncates it back). ``say`` prints a message (the trainer's: rank 0, above the bar).
    """

    def __init__(
        self,
        root: Path,
        metrics_path: Path,
        context: Distributed,
        config: TrainConfig,
        say: Callable[[str], None],
    ) -> None:
        self.root, self.metrics_path = root, metrics_path
        self.context, self.config, self.say = context, config, say
        self._fingerprint: tuple[PreparedData, dict[str, Any]] | None = None

    def folder(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is (or would be) written."""
        return self.root / f"step-{step:08d}"

    def fingerprint(self, data: PreparedData) -> dict[str, Any]:
        """What defines the run that trains on ``data`` (config, token ids, base model, processes; see
        :mod:`lorakit.train.fingerprint`). It hashes the data and the base model's weights: computed when
        first needed, once per ``data``."""
        if self._fingerprint is None or self._fingerprint[0] is not data:
            world_size = self.context.world_size
            self._fingerprint = (
                data,
                run_fingerprint(self.config, data.train, data.eval, world_size=world_size),
            )
        return self._fingerprint[1]

    def save(
        self,
        state: RunState,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        plan: Plan,
        data: PreparedData,
        base_lrs: list[float],
    ) -> str:
        """Write the checkpoint of ``state.step``; returns its folder (the caller's next ``last_checkpoint``).

        ``trainer_state.json`` holds ``state`` as given, i.e. with the previous ``last_checkpoint``.
        """
        rng = gather_tensors(self.context, capture_rng_state())
        # under FSDP every rank gathers the shards (collectives); rank 0 writes the whole tensors
        gathered = (full_state(model), full_optimizer_state(optimizer)) if is_sharded(model) else None
        if self.context.is_main:
            trainer_state = {
                **dataclasses.asdict(state),
                "plan": plan.as_dict(),
                "world_size": self.context.world_size,
                "scaler": scaler.state_dict() if scaler else None,
                "lr_scheduler": {"kind": self.config.lr_scheduler, "base_lrs": base_lrs},
                "config": dataclasses.asdict(self.config),
                "fingerprint": self.fingerprint(data),
                "metrics_records": len(read_metrics(self.metrics_path)),
            }
            folder = ckpt.save_checkpoint(
                self.root,
                state.step,
                model=model,
                optimizer=optimizer,
                trainer_state=trainer_state,
                rng_states=rng,
                keep=self.config.save_total_limit,
                method_state=adapters.method_state(model),
                gathered=gathered,
            )
            self.say(f"step {state.step}: checkpoint {folder}")
        barrier(self.context)
        return str(self.folder(state.step))

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        plan: Plan,
        data: PreparedData,
    ) -> RunState | None:
        """After setup: rank 0 removes what interrupted writes left; then, with ``config.resume``, the
        newest complete checkpoint is restored (:meth:`resume`). Its state, or None for a run from step 0."""
        if self.context.is_main:
            ckpt.clean_partial(self.root)
        barrier(self.context)
        return self.resume(model, optimizer, scaler, plan, data) if self.config.resume else None

    def resume(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        plan: Plan,
        data: PreparedData,
    ) -> RunState | None:
        """Restore the newest complete checkpoint into model, optimizer, scaler and RNGs, after checking that
        it belongs to this run (plan, and fingerprint of ``data``); its state, or None when there is none."""
        folder = ckpt.latest_checkpoint(self.root)
        if folder is None:
            self.say(f"resume: no complete checkpoint in {self.root}; starting from step 0")
            return None
        saved = ckpt.read_checkpoint(folder)
        trainer_state = saved["trainer_state"]
        self._check_compatible(trainer_state, folder, plan, data)
        ckpt.load_trainable_state(model, saved["trainable"])
        names = {id(p): n for n, p in model.named_parameters()}
        ckpt.optimizer_from_safetensors(
            optimizer, names, saved["optimizer_tensors"], saved["optimizer_index"]
        )
        adapters.load_method_state(model, saved["method"])
        if scaler is not None and trainer_state.get("scaler"):
            scaler.load_state_dict(trainer_state["scaler"])
        prefix = f"rank{self.context.rank}/"
        restore_rng_state({k[len(prefix) :]: v for k, v in saved["rng"].items() if k.startswith(prefix)})
        fields = {f.name for f in dataclasses.fields(RunState)}
        state = RunState(**{k: v for k, v in trainer_state.items() if k in fields})
        state.last_checkpoint = str(folder)
        if self.context.is_main:
            truncate_metrics(self.metrics_path, trainer_state.get("metrics_records", 0))
        self.say(f"resume: continuing from {folder} (step {state.step} of {plan.total_steps})")
        return state

    def _check_compatible(
        self, trainer_state: dict[str, Any], folder: Path, plan: Plan, data: PreparedData
    ) -> None:
        """Refuse a checkpoint of a different run, listing every difference; older checkpoints: plan only."""
        saved = trainer_state.get("fingerprint")
        if saved is None:
            self.say(
                f"warning: {folder} was written before lorakit recorded run fingerprints; could not check that "
                "model, data and settings are unchanged (only the data plan and number of processes are)"
            )
        else:
            allowed = allowed_changes(self.config.resume_allow_changes)
            for change in check_resume(saved, self.fingerprint(data), allowed, folder):
                self.say(f"resume: {change} (allowed by resume_allow_changes)")
        saved_plan, world = trainer_state.get("plan", {}), trainer_state.get("world_size")
        if saved_plan != plan.as_dict() or world != self.context.world_size:
            raise ckpt.CheckpointError(
                f"{folder} was written by a run with plan {saved_plan} on {world} process(es); this run has "
                f"{plan.as_dict()} on {self.context.world_size}. Resume with the same data, batch sizes, "
                "steps and number of processes, or use a new output_dir."
            )

    def check_output_dir(self) -> None:
        """A fresh run never silently overwrites the checkpoints of an earlier one."""
        allowed_changes(self.config.resume_allow_changes)  # a bad name fails before the model loads
        previous = ckpt.latest_checkpoint(self.root)
        if previous is None or self.config.resume:
            return
        if not self.config.overwrite_output_dir:
            raise ckpt.CheckpointError(
                f"{Path(self.config.output_dir)} already holds checkpoints of an earlier run (newest: "
                f"{previous.name}). Use --resume to continue it, --output_dir DIR for a new run, or "
                "--overwrite_output_dir to start over."
            )
        barrier(self.context)
        if self.context.is_main:
            shutil.rmtree(self.root)
        barrier(self.context)
