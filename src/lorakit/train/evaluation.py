"""Held-out loss: the mean cross-entropy per trained token, and perplexity ``exp(loss)``.

Long evaluations and sample generations show a tqdm bar on stderr, under the trainer's policy (only the
main process, ``RANK`` 0, draws bars) and additionally only when stderr is a terminal, so logs, pipes and
CI output stay free of carriage-return noise (:func:`show_progress`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.data import collate
from lorakit.train.batching import count_trained_tokens, forward_loss_sum
from lorakit.train.setup import autocast_context


def show_progress(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """True on the main process (``RANK`` unset or 0) when ``stream`` (default stderr) is a terminal."""
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    if environ.get("RANK", "0").strip() not in ("", "0"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def progress_bar(total: int, desc: str, enabled: bool | None = None) -> tqdm:
    """A transient tqdm bar on stderr (cleared when done); ``enabled=None`` applies :func:`show_progress`."""
    show = show_progress() if enabled is None else enabled
    return tqdm(total=total, desc=desc, leave=False, disable=not show, file=sys.stderr)


@torch.no_grad()
def loss_sum_and_tokens(
    model: nn.Module,
    examples: list[dict[str, Any]],
    pad_token_id: int,
    *,
    batch_size: int = 8,
    precision: str = "fp32",
    progress: bool | None = None,
) -> tuple[float, int]:
    """``(sum_t CE_t, number of trained tokens)`` over ``examples`` in eval mode (no dropout).

    ``progress``: draw a bar over the batches (None = :func:`show_progress`).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    with progress_bar(math.ceil(len(examples) / batch_size), "eval", progress) as bar:
        for start in range(0, len(examples), batch_size):
            batch = {
                k: v.to(device)
                for k, v in collate(examples[start : start + batch_size], pad_token_id).items()
            }
            with autocast_context(precision, device):
                loss_sum += forward_loss_sum(model, batch).item()
            tokens += count_trained_tokens(batch["labels"])
            bar.update(1)
    model.train(was_training)
    return loss_sum, tokens
