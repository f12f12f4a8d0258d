"""``method: adalora`` for the lorakit trainer (listed in ``lorakit.train.adapters.ADAPTER_METHODS``)."""

from __future__ import annotations

from typing import Any

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
