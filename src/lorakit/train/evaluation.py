"""Held-out loss: the mean cross-entropy per trained token, and perplexity ``exp(loss)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.data import collate
from lorakit.train.batching import count_trained_tokens, forward_loss_sum
from lorakit.train.setup import autocast_context


@torch.no_grad()
def loss_sum_and_tokens(
    model: nn.Module,
    examples: list[dict[str, Any]],
    pad_token_id: int,
    *,
    batch_size: int = 8,
    precision: str = "fp32",
) -> tuple[float, int]:
    """``(sum_t CE_t, number of trained tokens)`` over ``examples`` in eval mode (no dropout)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {
            k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_token_id).items()
        }
        with autocast_context(precision, device):
            loss_sum += forward_loss_sum(model, batch).item()
        tokens += count_trained_tokens(batch["labels"])
    model.train(was_training)
    return loss_sum, tokens
