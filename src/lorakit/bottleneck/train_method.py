"""``method: adapter`` for the lorakit trainer (its row in ``lorakit.methods.METHODS``)."""

from __future__ import annotations

from typing import Any

from lorakit.bottleneck.config import AdapterConfig


def build_adapter_config(config: Any, target_modules: list[str] | str, total_steps: int) -> AdapterConfig:
    """A bottleneck Adapter of width ``lora_r`` (about LoRA's parameter count at the same r per module).

    ``target_modules: all-linear`` (the trainer's default) means Houlsby's placement here: one adapter after
    each attention output projection and one after each feed-forward block (see ``HOULSBY_TARGETS``).
    """
    if config.use_rslora or config.use_dora:
        raise ValueError("method: adapter does not combine with use_rslora or use_dora; turn them off.")
    return AdapterConfig(
        task_type="CAUSAL_LM",
        target_modules=None if target_modules == "all-linear" else target_modules,
        bottleneck_size=config.lora_r,
        adapter_dropout=config.lora_dropout,
        modules_to_save=config.modules_to_save,
    )
