"""``method: adalora`` for the lorakit trainer: its config builder and its hooks (its row in ``lorakit.methods``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.adalora.config import AdaLoraConfig, adalora_config_for_run


def build_adalora_config(config: Any, target_modules: list[str] | str, total_steps: int) -> AdaLoraConfig:
    """AdaLoRA for a run of ``total_steps`` optimizer steps ending at average rank ``lora_r``.

    ``config`` is a :class:`lorakit.train.config.TrainConfig`; ``lora_alpha``, ``lora_dropout`` and
    ``modules_to_save`` carry over, the schedule is :func:`adalora_config_for_run`'s default.
    """
    if config.use_rslora or config.use_dora:
        raise ValueError("method: adalora does not combine with use_rslora or use_dora; turn them off.")
    return adalora_config_for_run(
        total_step=total_steps,
        r=config.lora_r,
        target_modules=target_modules,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        task_type="CAUSAL_LM",
        modules_to_save=config.modules_to_save,
    )


class AdaLoraHooks:
    """The trainer hooks of AdaLoRA (see :class:`lorakit.methods.TrainerHooks`): the orthogonality regularizer,
    the importance update and rank allocation after each optimizer step, and the allocator state in checkpoints.
    """

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """``orth_reg_weight * R(P, Q)`` (Zhang et al. 2023, eq. 4); None when the weight is 0."""
        tuner = model.base_model
        if tuner.trainable_adapter_name is None:
            return None
        weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
        return weight * tuner.orthogonal_regularization() if weight > 0 else None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.base_model.allocator_state_dict()

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            model.base_model.load_allocator_state_dict(tensors)
