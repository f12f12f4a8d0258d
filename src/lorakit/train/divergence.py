"""Divergence: stop a run whose numbers blow up, before it writes or keeps anything broken.

A run is stopped with :class:`TrainingDiverged` (``lorakit train`` exits with 1) when

1. the training loss or the gradient norm of a step is NaN or infinite (checked before the optimizer
   step, so the parameters are never updated from it; with fp16 the gradient scaler skips such steps
   instead, as it is meant to);
2. a trainable parameter is NaN or infinite after the optimizer step (``learning_rate: inf`` does this
   with a finite loss and gradient); checked on every step with one fused norm per step and, only when
   that norm is not finite, an exact per-tensor test;
3. a held-out loss is NaN or infinite, or rises far above the best held-out loss so far (the evaluation
   at step 0, the base model, included):

   ``eval_loss > best + divergence_threshold * max(best, 2.0)``

   i.e. with the default ``divergence_threshold: 0.5``, more than ``max(1.0, 50% of best)`` above the
   best (in nats per token). A run that merely overfits creeps up slowly; one whose learning rate is far
   too high jumps (SmolLM2 at lr 1e6: 3.44 -> 10.8, uniform guessing). ``divergence_threshold: none``
   turns this rule off (non-finite values always stop the run).

The message names the step, the last good checkpoint (never a non-finite one: those are refused when
written, see :func:`lorakit.train.checkpoint.check_finite`) and ``best/`` with its step and loss, which
``save_total_limit`` never prunes (:mod:`lorakit.train.early_stopping`). Nothing is saved from the
diverged state: no checkpoint, no final ``adapter/``. A resumed run replays the held-out rule from the
eval lines of ``metrics.jsonl``, like early stopping.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.train.distributed import all_reduce_sum
from lorakit.train.fsdp import full_tensor, local_tensors
from lorakit.train.metrics import read_metrics

RELATIVE_FLOOR = 2.0  # below a best loss of 2 nats the margin stays threshold * 2 (1.0 at the default 0.5)


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm, the parameters or the held-out loss diverged; the message says where."""


def first_non_finite(parameters: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, float] | None:
    """``(name, nan or inf)`` of the first parameter holding a non-finite value, or None (exact check)."""
    for name, tensor in parameters:
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            return name, float(tensor.detach()[~finite].flatten()[0].float().item())
    return None


def all_finite_fast(tensors: list[torch.Tensor]) -> bool:
    """One fused norm over ``tensors``: True means all finite; False may be an overflow of huge values."""
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


@dataclass
class HeldOutRule:
    """The held-out rule (3. in the module docstring); ``threshold`` None = only non-finite losses stop."""

    threshold: float | None = 0.5
    best_loss: float | None = None
    best_step: int | None = None

    def limit(self) -> float | None:
        if self.threshold is None or self.best_loss is None:
            return None
        return self.best_loss + self.threshold * max(self.best_loss, RELATIVE_FLOOR)

    def check(self, step: int, loss: float) -> str | None:
        """Count the evaluation at ``step``; the reason to stop, or None."""
        if not math.isfinite(loss):
            return f"the held-out loss became {loss} at step {step}"
        limit = self.limit()
        if limit is not None and loss > limit:
            return (
                f"the held-out loss rose to {loss:.4f} at step {step}, above best {self.best_loss:.4f} (step "
                f"{self.best_step}) + divergence_threshold {self.threshold:g} x max(best, {RELATIVE_FLOOR:g}) = {limit:.4f}"
            )
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
        return None

    def replay(self, metrics_path: Path, resume_step: int) -> None:
        """Re-count the evaluations of ``metrics_path`` up to the resumed checkpoint's step."""
        for record in read_metrics(metrics_path):
            if record.get("eval_loss") is not None and record["step"] <= resume_step:
                self.check(record["step"], record["eval_loss"])


class DivergenceMixin:
    """Divergence checks of :class:`lorakit.train.loop.Trainer` (reads its config, state, model, best)."""

    def _diverged_message(self, what: str, value: float | str) -> str:
        return self._diverged_text(f"the {what} became {value} at step {self.state.step + 1}")

    def _diverged_text(self, reason: str, advice: str = "") -> str:
        kept = self.state.last_checkpoint or "none written yet"
        best = self.best.describe()
        best_text = f" Best held-out adapter: {best}." if best else ""
        return (
            f"Training stopped: {reason}. Last good checkpoint: {kept}.{best_text} Nothing was saved from "
            "the diverged state. Lower learning_rate, use precision fp32 or bf16, or check the data for "
            f"broken examples{advice}."
        )

    def check_parameters(self) -> None:
        """After the optimizer step of step ``state.step + 1``: every trainable parameter finite."""
        finite = all_finite_fast([p.detach() for p in local_tensors(self.trainable)])  # this rank's shards
        if self.context.enabled:  # every rank must agree (each holds different shards under FSDP)
            flag = torch.tensor([0.0 if finite else 1.0], device=self.context.device)
            finite = all_reduce_sum(self.context, flag).item() == 0
        if finite:
            return
        parameters = self.model.named_parameters()
        bad = first_non_finite((n, full_tensor(p.detach())) for n, p in parameters if p.requires_grad)
        if bad is not None:
            name, value = bad
            raise TrainingDiverged(self._diverged_message(f"parameter '{name}'", value))

    def check_held_out(self, loss: float | None) -> None:
        """After the evaluation at ``state.step``: the held-out rule; :class:`TrainingDiverged` on divergence."""
        if loss is None:
            return
        reason = self.held_out_rule.check(self.state.step, loss)
        if reason is not None:
            hint = (
                "; or raise divergence_threshold (none turns this check off)" if math.isfinite(loss) else ""
            )
            raise TrainingDiverged(self._diverged_text(reason, hint))

    def start_held_out(self, resume_step: int | None) -> None:
        """Before the first evaluation: a fresh rule, or on resume the best so far from ``metrics.jsonl``."""
        self.held_out_rule = HeldOutRule(self.config.divergence_threshold)
        if resume_step is not None:
            self.held_out_rule.replay(self.metrics.path, resume_step)


def describe_non_finite(model: Any) -> str | None:
    """For ``lorakit eval``: a sentence naming the first non-finite parameter of ``model``, or None."""
    bad = first_non_finite((n, p.detach()) for n, p in model.named_parameters())
    if bad is None:
        return None
    count = sum(1 for _, p in model.named_parameters() if not bool(torch.isfinite(p).all()))
    return f"{count} weight tensor(s) hold NaN or infinite values (first: '{bad[0]}' = {bad[1]})"
