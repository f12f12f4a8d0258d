"""Optimizers for adapters at PEFT's import path (``peft.optimizers`` -> ``lorakit.optimizers``).

:func:`create_loraplus_optimizer` takes PEFT's arguments (keyword-only ``lr`` and ``loraplus_lr_ratio``;
``loraplus_lr_embedding`` and ``loraplus_weight_decay`` as keywords) and builds lorakit's LoRA+ groups
(:mod:`lorakit.optim`, where the grouping and the paper's reasoning are documented). ``lorakit.optim`` keeps its
own signature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.optim import create_loraplus_optimizer as _create_loraplus_optimizer

__all__ = ["create_loraplus_optimizer"]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """A LoRA+ optimizer (Hayou et al. 2024): ``lora_B`` at ``lr * loraplus_lr_ratio``, ``lora_A`` at ``lr``.

    Args:
        model: the model whose trainable parameters are optimized.
        optimizer_cls: e.g. ``torch.optim.AdamW``.
        lr: learning rate of ``lora_A`` (and of every other non-B matrix).
        loraplus_lr_ratio: ``lr_B / lr_A``.
        kwargs: ``loraplus_lr_embedding`` (default 1e-6) for LoRA embedding layers, ``loraplus_weight_decay``
            (default 0; a plain ``weight_decay`` is used when it is not given) for matrices; the rest goes to
            ``optimizer_cls``.
    """
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    weight_decay = kwargs.pop("loraplus_weight_decay", kwargs.pop("weight_decay", 0.0))
    return _create_loraplus_optimizer(
        model,
        optimizer_cls,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_lr_embedding=embedding_lr,
        weight_decay=weight_decay,
        **kwargs,
    )
