"""The one place that turns ``TrainConfig.method`` into a PEFT-style adapter config.

Each method has a builder ``(config, target_modules, total_steps) -> adapter config`` registered in
:data:`ADAPTER_METHODS`; :func:`attach_adapter` calls ``lorakit.get_peft_model`` with its result.
``lora`` and ``dora`` are built in; ``adalora`` (needs ``total_steps`` for its rank budget schedule)
and ``adapter`` plug in with :func:`register_method` from their own modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lorakit import LoraConfig, TaskType, get_peft_model
from lorakit.train.config import ConfigError, TrainConfig

AdapterBuilder = Callable[[TrainConfig, Any, int], Any]
ADAPTER_METHODS: dict[str, AdapterBuilder] = {}


def register_method(name: str, builder: AdapterBuilder) -> None:
    """Make ``method: <name>`` build its adapter config with ``builder``."""
    ADAPTER_METHODS[name] = builder


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


register_method("lora", _lora_config)
register_method("dora", _lora_config)


def _import_plugins() -> None:
    """Let optional method modules register themselves (they may not exist in this version)."""
    import importlib

    for module in ("lorakit.adalora", "lorakit.adapter"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def build_adapter_config(config: TrainConfig, total_steps: int) -> Any:
    """The PEFT-style config for ``config.method`` (target_modules empty = 'all-linear')."""
    if config.method not in ADAPTER_METHODS:
        _import_plugins()
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
