"""The training loop: token-normalised accumulation, evaluation, checkpoints, resume.

One optimizer step (see :mod:`lorakit.train.batching` for the math):

1. count the trained tokens ``N`` of this step's micro-batches, summed over ranks;
2. for each micro-batch: ``(sum of token cross-entropies) / N`` -> backward;
3. sum gradients over ranks, clip to ``max_grad_norm``, set the scheduled lr, AdamW step.

Only rank 0 writes files and prints. Every ``save_steps`` a checkpoint is written atomically; with
``resume`` the newest complete one restores adapter, optimizer, RNG states and data position, so an
interrupted run ends with exactly the adapter of an uninterrupted one (:mod:`lorakit.train.checkpointer`).
Each evaluation feeds early stopping and ``best/`` (:mod:`lorakit.train.early_stopping`); each metrics line
also goes to the ``report_to`` trackers (:mod:`lorakit.train.trackers`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lorakit.data import collate
from lorakit.train import checkpoint as ckpt
from lorakit.train.adapters import after_optimizer_step, attach_adapter, regularization_loss
from lorakit.train.batching import count_trained_tokens, epoch_order, forward_loss_sum, rank_micro_batches
from lorakit.train.checkpointer import Checkpointer, RunState
from lorakit.train.config import TrainConfig, config_to_yaml
from lorakit.train.cpu_memory import keep_freed_memory, restore_defaults
from lorakit.train.data_prep import PreparedData, prepare_data
from lorakit.train.distributed import (
    Distributed,
    all_reduce_gradients,
    all_reduce_sum,
    barrier,
    init_distributed,
    progress_bars,
    shutdown,
)
from lorakit.train.divergence import DivergenceMixin, TrainingDiverged
from lorakit.train.early_stopping import BestAdapter
from lorakit.train.evaluation import loss_sum_and_tokens
from lorakit.train.fsdp import check_config as check_fsdp_config
from lorakit.train.fsdp import full_tensor, gathered_state, shard_model
from lorakit.train.lock import hold_output_dir
from lorakit.train.metrics import MetricsLog, format_summary, peak_memory_bytes, perplexity, read_metrics
from lorakit.train.plot import plot_loss_curves
from lorakit.train.samples import before_after, print_before_after, record_prompt
from lorakit.train.schedule import set_learning_rates
from lorakit.train.setup import Plan, autocast_context, build_optimizer, load_base, make_plan, seed_everything
from lorakit.train.signals import StopSignals, stop_point
from lorakit.train.trackers import Trackers, open_trackers


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)


def train(config: TrainConfig) -> TrainResult:
    """Run ``config`` (under torchrun: data-parallel over all ranks)."""
    context = init_distributed(config.device)
    keep_memory = config.cpu_keep_freed_memory and context.device.type == "cpu" and keep_freed_memory()
    try:  # one run per output folder (lorakit.train.lock); SIGTERM/Ctrl-C stop at a step (.signals)
        with hold_output_dir(config.output_dir, context), StopSignals() as stopper:
            return Trainer(config, context, keeps_freed_memory=keep_memory, stopper=stopper).run()
    finally:
        if keep_memory:
            restore_defaults()  # a notebook or test process that called train() gets its memory back
        shutdown(context)


class Trainer(DivergenceMixin):
    def __init__(
        self,
        config: TrainConfig,
        context: Distributed,
        keeps_freed_memory: bool = False,
        stopper: StopSignals | None = None,
    ) -> None:
        self.config, self.context = config, context
        self.stopper = stopper or StopSignals()  # not installed: never signalled
        self.keeps_freed_memory = keeps_freed_memory  # glibc malloc settings of lorakit.train.cpu_memory
        self.output_dir = Path(config.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", enabled=context.is_main)
        self.checkpointer = Checkpointer(self.checkpoint_root, self.metrics.path, context, config, self.say)
        self.state = RunState()
        self.best = BestAdapter.from_config(config, self.output_dir, context.is_main)
        self.trackers = Trackers()
        self.bar: tqdm | None = None
        self._orders: dict[int, list[int]] = {}
        self.started = time.perf_counter()
        self.sharded = config.distributed == "fsdp"  # FSDP2 (lorakit.train.fsdp); else DDP or one process

    def say(self, message: str) -> None:
        if self.context.is_main:
            if self.bar is not None:
                self.bar.write(message)
            else:
                print(message, flush=True)

    # ------------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        config = self.config
        check_fsdp_config(config, self.context)
        seed_everything(config.seed)
        if not self.context.is_main:
            barrier(self.context)  # rank 0 loads first: it may convert the embedded model into the cache
        with progress_bars(enabled=self.context.is_main):  # one weight-loading bar, not one per rank
            self.model, self.tokenizer = load_base(config, self.context.device)
        if self.context.is_main:
            barrier(self.context)
        self.data: PreparedData = prepare_data(config, self.tokenizer, self.say)
        self.plan: Plan = make_plan(config, len(self.data.train), self.context.world_size)
        self.model = attach_adapter(self.model, config, self.plan.total_steps)
        self.param_counts = self.model.get_nb_trainable_parameters()
        if self.sharded:
            self.say(shard_model(self.model, config, self.context))
        torch.manual_seed(config.seed + 1_000_003 * (self.context.rank + 1))  # per-rank dropout stream
        self.model.train()
        # The compiled callable runs only the training forward; evaluation, generation and saving use the
        # eager model (the same module objects and parameters), so generation's growing shapes never recompile.
        self.train_forward = torch.compile(self.model.get_base_model()) if config.compile else self.model
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.base_lrs = build_optimizer(self.model, config)
        fp16 = config.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.context.device.type, enabled=fp16) if fp16 else None
        self.pad_id = self.tokenizer.pad_token_id
        if config.max_steps and self.plan.total_steps < self.plan.steps_per_epoch:
            self.say(
                f"note: max_steps={config.max_steps} covers {self.plan.total_steps / self.plan.steps_per_epoch:.0%} "
                "of one epoch; use --max_steps none --num_epochs N to train on all of the data"
            )
        trainable, total = self.param_counts
        self.say(
            f"model: {total:,} parameters, {trainable:,} trainable ({100 * trainable / total:.3f}%); "
            f"{self.plan.total_steps} steps of {self.plan.global_batch} sequences "
            f"({self.plan.steps_per_epoch} per epoch, {self.context.world_size} process(es))"
        )
        if self.keeps_freed_memory:
            self.say(
                "cpu: freed memory is kept for the next step (cpu_keep_freed_memory; false turns it off)"
            )

    # -------------------------------------------------------------------------------------------- data
    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's collated micro-batches for optimizer step ``step`` (a pure function of it)."""
        epoch, step_in_epoch = divmod(step, self.plan.steps_per_epoch)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.plan.num_examples, self.config.seed, epoch)}
        groups = rank_micro_batches(
            self._orders[epoch],
            step_in_epoch,
            micro_batch=self.config.micro_batch_size,
            accumulation=self.config.gradient_accumulation_steps,
            rank=self.context.rank,
            world_size=self.context.world_size,
        )
        return [collate([self.data.train[i] for i in group], self.pad_id) for group in groups if group]

    # -------------------------------------------------------------------------------------------- step
    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        local = [
            sum(count_trained_tokens(b["labels"]) for b in batches),
            sum(int(b["attention_mask"].sum()) for b in batches),
        ]
        counts = all_reduce_sum(
            self.context, torch.tensor(local, dtype=torch.float64, device=self.context.device)
        )
        global_tokens = max(counts[0].item(), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.context.device)
        for batch in batches:
            batch = {k: v.to(self.context.device) for k, v in batch.items()}
            with autocast_context(self.config.precision, self.context.device):
                micro_loss = forward_loss_sum(self.train_forward, batch)
            scaled = micro_loss / global_tokens
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += micro_loss.detach().double()
        loss = all_reduce_sum(self.context, loss_sum).item() / global_tokens
        if not math.isfinite(loss):
            raise TrainingDiverged(self._diverged_message("loss", loss))
        self._add_regularizer()
        if not self.sharded:  # FSDP reduce-scatters the gradients itself
            all_reduce_gradients(self.context, self.trainable)
        grad_norm = self._clip_gradients()
        lr = set_learning_rates(
            self.optimizer,
            self.base_lrs,
            self.state.step,
            self.plan.total_steps,
            self.plan.warmup_steps,
            self.config.lr_scheduler,
        )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        after_optimizer_step(self.model, self.state.step + 1)
        self.check_parameters()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(counts[0]),
            "input_tokens": int(counts[1]),
        }

    def _add_regularizer(self) -> None:
        """A method's regulariser (AdaLoRA) once per step; each rank adds 1/world_size of it."""
        penalty = regularization_loss(self.model)
        if penalty is not None:
            scaled = penalty / self.context.world_size
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def _clip_gradients(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)).item()
        if not math.isfinite(norm) and self.scaler is None:
            raise TrainingDiverged(self._diverged_message("gradient norm", norm))
        return norm

    # -------------------------------------------------------------------------------------------- eval
    def evaluate(self) -> tuple[float | None, int]:
        """Mean token loss on the held-out set: each rank takes every world_size-th example, sums are reduced."""
        if not self.data.eval:
            return None, 0
        shard = self.data.eval[self.context.rank :: self.context.world_size]
        loss_sum, tokens = loss_sum_and_tokens(
            self.model,
            shard,
            self.pad_id,
            batch_size=self.config.micro_batch_size,
            precision=self.config.precision,
        )
        totals = all_reduce_sum(
            self.context, torch.tensor([loss_sum, tokens], dtype=torch.float64, device=self.context.device)
        )
        return totals[0].item() / max(totals[1].item(), 1.0), int(totals[1].item())

    def log_eval(self) -> float | None:
        loss, tokens = self.evaluate()
        if loss is not None:
            record = {
                "step": self.state.step,
                "eval_loss": loss,
                "eval_ppl": perplexity(loss),
                "eval_tokens": tokens,
            }
            self.metrics.write(record)
            self.say(f"step {self.state.step}: held-out loss {loss:.4f}, perplexity {perplexity(loss):.2f}")
            self.check_held_out(loss)  # first: a diverged evaluation never becomes best/
            self.best.observe(self.state.step, loss, self.model)
        return loss

    # ------------------------------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """A checkpoint of ``state.step`` (:func:`lorakit.train.signals.stop_point` writes one too)."""
        self.state.last_checkpoint = self.checkpointer.save(
            self.state, self.model, self.optimizer, self.scaler, self.plan, self.data, self.base_lrs
        )

    # --------------------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        self.checkpointer.check_output_dir()
        self.setup()
        if self.context.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        # with resume: the newest checkpoint (a changed run is refused before config.yaml)
        restored = self.checkpointer.start(self.model, self.optimizer, self.scaler, self.plan, self.data)
        self.state, resumed = restored or self.state, restored is not None
        if self.context.is_main:
            (self.output_dir / "config.yaml").write_text(config_to_yaml(self.config), encoding="utf-8")
        if not resumed and self.context.is_main and self.metrics.path.exists():
            self.metrics.path.unlink()
        self._start_tracking(resumed)
        try:
            if not resumed:
                self.state.eval_loss_start = self.log_eval()
            self.train_loop()
            result = self.finish()
        except BaseException:
            self.trackers.close(failed=True)
            raise
        self.trackers.close()
        return result

    def _start_tracking(self, resumed: bool) -> None:
        """Early-stopping state (replayed from the kept metrics on resume) and the report_to trackers."""
        resume_step = self.state.step if resumed else None
        self.best.start(bool(self.data.eval), self.metrics.path, resume_step, say=self.say)
        self.start_held_out(resume_step)
        self.trackers = open_trackers(self.config, enabled=self.context.is_main, resume_step=resume_step)
        self.metrics.listeners.append(self.trackers.log_record)

    def train_loop(self) -> None:
        config, plan = self.config, self.plan
        self.bar = tqdm(
            total=plan.total_steps, initial=self.state.step, desc="train", disable=not self.context.is_main
        )
        self.stopper.graceful = True  # from here a first SIGTERM/SIGINT ends the step, then stop_point saves
        try:
            while self.state.step < plan.total_steps and not self.best.should_stop:
                started = time.perf_counter()
                stats = self.train_step(self.micro_batches(self.state.step))
                elapsed = time.perf_counter() - started
                self.state.step += 1
                self.state.trained_tokens += stats["tokens"]
                self.state.train_time_s += elapsed
                self._log_step(stats, elapsed)
                if (
                    config.eval_steps
                    and self.state.step % config.eval_steps == 0
                    and self.state.step < plan.total_steps
                ):
                    loss = self.log_eval()
                    if self.best.should_stop:  # the final checkpoint below then holds eval_loss_end
                        self.state.eval_loss_end = loss
                        self.say(self.best.stop_message())
                if config.save_steps and self.state.step % config.save_steps == 0:
                    self.save()
                stop_point(self)
        finally:
            self.bar.close()
            self.bar = None

    def _log_step(self, stats: dict[str, float], elapsed: float) -> None:
        tokens_per_s = stats["input_tokens"] / max(elapsed, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tokens_per_s:.0f}"
        )
        if self.state.step % self.config.logging_steps == 0 or self.state.step == self.plan.total_steps:
            epoch = self.state.step / self.plan.steps_per_epoch
            record = {
                **stats,
                "step": self.state.step,
                "epoch": round(epoch, 4),
                "tokens_per_s": tokens_per_s,
            }
            self.metrics.write({**record, "elapsed_s": self.state.train_time_s})

    # ------------------------------------------------------------------------------------------ finish
    def finish(self) -> TrainResult:
        if self.state.eval_loss_end is None:  # not yet done before a checkpoint this run resumed from
            self.state.eval_loss_end = self.log_eval()
        if self.config.save_steps == 0 or self.state.step % self.config.save_steps != 0:
            self.save()
        stop_point(self, last=True)  # a signal during the final evaluation stops here; later ones abort
        self.best.restore(self.model, say=self.say)  # after the final checkpoint, which keeps the last state
        adapter_dir = self.output_dir / "adapter"
        result = TrainResult(self.output_dir, adapter_dir)
        gathered = gathered_state(self.model)  # every rank, under FSDP
        if self.context.is_main:
            ckpt.write_adapter(self.model, adapter_dir, self.checkpoint_root, gathered)
            result.summary = self._summary()
            plot_loss_curves(read_metrics(self.metrics.path), self.output_dir / "loss.png")
            ckpt.write_json(self.output_dir / "summary.json", result.summary)
            self.say("\n" + format_summary(result.summary))
        if self.context.is_main or self.sharded:  # a sharded model generates on every rank together
            result.samples = self._samples()
        if self.context.is_main:
            self.say(
                f"\nadapter: {adapter_dir}  metrics: {self.metrics.path}  plot: {self.output_dir / 'loss.png'}"
            )
        barrier(self.context)
        return result

    def _summary(self) -> dict[str, Any]:
        return {
            "trainable_params": self.param_counts[0],
            "total_params": self.param_counts[1],
            "steps": self.state.step,
            "trained_tokens": self.state.trained_tokens,
            "train_time_s": self.state.train_time_s,
            "run_time_s": time.perf_counter() - self.started,
            "peak_memory_bytes": peak_memory_bytes(self.context.device),
            "eval_loss_start": self.state.eval_loss_start,
            "eval_loss_end": self.state.eval_loss_end,
            "world_size": self.context.world_size,
            **self.best.summary(),
        }

    def _samples(self) -> list[dict[str, str]]:
        prompts = self.config.sample_prompts or [record_prompt(r) for r in self.data.eval_records[:3]]
        if not prompts or self.config.sample_max_new_tokens <= 0:
            return []
        results = before_after(self.model, self.tokenizer, prompts, self.config.sample_max_new_tokens)
        print_before_after(results, self.say)
        if self.context.is_main:
            ckpt.write_json(self.output_dir / "samples.json", {"samples": results})
        return results
