"""The one place that turns ``TrainConfig.method`` into a PEFT-style adapter config.

Each method has a builder ``(config, target_modules, total_steps) -> adapter config`` listed in
:data:`ADAPTER_METHODS`; :func:`attach_adapter` calls ``lorakit.get_peft_model`` with its result.
``adalora`` needs ``total_steps`` for its rank budget schedule; its builder and the bottleneck ``adapter``'s
live in their own packages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit import LoraConfig, TaskType, get_peft_model
from lorakit.adalora.train_method import build_adalora_config
from lorakit.bottleneck.train_method import build_adapter_config as build_bottleneck_config
from lorakit.train.config import ConfigError, TrainConfig

AdapterBuilder = Callable[[TrainConfig, Any, int], Any]


def _lora_config(config: TrainConfig, target_modules: Any, total_steps: int) -> LoraConfig:
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        modules_to_save=config.modules_to_save,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora or config.method == "dora",
    )


# method name -> builder ``(config, target_modules, total_steps) -> adapter config``; add new methods here.
ADAPTER_METHODS: dict[str, AdapterBuilder] = {
    "lora": _lora_config,
    "dora": _lora_config,
    "adalora": build_adalora_config,
    "adapter": build_bottleneck_config,
}


def build_adapter_config(config: TrainConfig, total_steps: int) -> Any:
    """The PEFT-style config for ``config.method`` (target_modules empty = 'all-linear')."""
    builder = ADAPTER_METHODS.get(config.method)
    if builder is None:
        available = ", ".join(sorted(ADAPTER_METHODS))
        raise ConfigError(
            f"method '{config.method}' is not available in this lorakit build; use one of {available}."
        )
    target_modules = config.target_modules or "all-linear"
    if isinstance(target_modules, list) and target_modules == ["all-linear"]:
        target_modules = "all-linear"
    return builder(config, target_modules, total_steps)


def attach_adapter(model: nn.Module, config: TrainConfig, total_steps: int) -> nn.Module:
    """Freeze ``model`` and wrap it with the adapter described by ``config``."""
    try:
        return get_peft_model(model, build_adapter_config(config, total_steps))
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"Could not add the adapter: {error}") from None


# ------------------------------------------------------------------------------------- per-method hooks
# Methods whose tuner exposes these (AdaLoRA) get them called by the loop; for LoRA they do nothing.


def _tuner(model: nn.Module) -> Any:
    return getattr(model, "base_model", None)


def regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """AdaLoRA's ``orth_reg_weight * R(P, Q)`` (Zhang et al. 2023, eq. 4); None for other methods."""
    tuner = _tuner(model)
    if not hasattr(tuner, "orthogonal_regularization"):
        return None
    weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
    return weight * tuner.orthogonal_regularization() if weight > 0 else None


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """AdaLoRA's importance update and rank allocation (needs the gradients: call before zero_grad)."""
    tuner = _tuner(model)
    if hasattr(tuner, "update_and_allocate"):
        tuner.update_and_allocate(step)


def method_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Extra training state of the method (AdaLoRA: importance EMAs and rank pattern) as tensors."""
    tuner = _tuner(model)
    return tuner.allocator_state_dict() if hasattr(tuner, "allocator_state_dict") else {}


def load_method_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    tuner = _tuner(model)
    if tensors and hasattr(tuner, "load_allocator_state_dict"):
        tuner.load_allocator_state_dict(tensors)
