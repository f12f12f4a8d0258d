"""Learning-rate schedules: linear warm-up, then linear decay, cosine decay or constant.

For optimizer step ``s`` (0-based) of ``T`` total steps with ``W`` warm-up steps, the factor that
multiplies each parameter group's base learning rate is

* warm-up, ``s < W``:   ``(s + 1) / W``  (the first step already moves; step ``W - 1`` reaches 1),
* afterwards, with progress ``p = (s - W) / (T - W)`` in ``[0, 1)``:
  linear ``1 - p``; cosine ``(1 + cos(pi p)) / 2`` (Loshchilov & Hutter 2017, SGDR, eq. 5 with
  one cycle and eta_min = 0); constant ``1``.

The factor is a pure function of the step, so resuming needs only the step count.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str = "cosine") -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (see module docstring)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"Unknown schedule '{kind}'; use linear, cosine or constant.")


def resolve_warmup(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    """Explicit warm-up steps win; otherwise ``ceil(ratio * total)``, kept below ``total``."""
    if warmup_steps is not None:
        return max(0, min(warmup_steps, total_steps))
    return min(math.ceil(warmup_ratio * total_steps), max(total_steps - 1, 0))


def set_learning_rates(
    optimizer: torch.optim.Optimizer, base_lrs: list[float], step: int, total: int, warmup: int, kind: str
) -> float:
    """Write ``base_lr * lr_factor(step)`` into every group; returns the first group's rate."""
    factor = lr_factor(step, total, warmup, kind)
    for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = base_lr * factor
    return optimizer.param_groups[0]["lr"]
