"""The trainer's side of the method table: ``TrainConfig.method`` to an adapter config, and the method's hooks.

:func:`build_adapter_config` calls the method's builder from :data:`lorakit.methods.METHODS`;
:func:`attach_adapter` wraps the model with ``lorakit.get_peft_model``. The loop calls the hooks of the model's
method through the four functions at the end (AdaLoRA's; they do nothing for the other methods).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit import get_peft_model
from lorakit.methods import hooks_of, method_named
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.setup import (
    DTYPES,
    quantize_outside_targets,
    reproducible_init,
    set_quantized_compute_dtype,
)


def build_adapter_config(config: TrainConfig, total_steps: int) -> Any:
    """The PEFT-style config for ``config.method`` (target_modules empty = 'all-linear')."""
    try:
        method = method_named(config.method)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    target_modules = config.target_modules or "all-linear"
    if isinstance(target_modules, list) and target_modules == ["all-linear"]:
        target_modules = "all-linear"
    return method.build_config(config, target_modules, total_steps)


def attach_adapter(model: nn.Module, config: TrainConfig, total_steps: int) -> nn.Module:
    """Freeze ``model`` and wrap it with the adapter described by ``config``.

    With ``init_lora_weights: loftq`` the adapted layers become 4-bit (LoftQ) and, with ``load_in_4bit``, every
    other Linear but the head is quantized to plain NF4 first (the model was loaded in full precision).
    """
    loftq = config.init_lora_weights == "loftq"
    compute_dtype = DTYPES[config.compute_dtype]
    try:
        adapter_config = build_adapter_config(config, total_steps)
        if loftq and config.load_in_4bit:
            quantize_outside_targets(model, adapter_config, compute_dtype)
        with reproducible_init(config.init_lora_weights):
            model = get_peft_model(model, adapter_config)
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"Could not add the adapter: {error}") from None
    if loftq:
        set_quantized_compute_dtype(model, compute_dtype)
    return model


def regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """The method's extra loss term for this optimizer step (AdaLoRA's orthogonality regularizer), or None."""
    return hooks_of(model).regularization_loss(model)


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """The method's work after ``optimizer.step()`` (AdaLoRA: importance update and rank allocation)."""
    hooks_of(model).after_optimizer_step(model, step)


def method_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Extra training state of the method (AdaLoRA: importance EMAs and rank pattern) as tensors."""
    return hooks_of(model).state(model)


def load_method_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    hooks_of(model).load_state(model, tensors)
