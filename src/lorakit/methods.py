"""The adapter methods lorakit offers: one explicit table, no registration by import side effects.

Each row names a method as ``lorakit train --method`` spells it and says everything the library and the trainer
need: the PEFT type written to ``adapter_config.json``, the config class that reads that file, the tuner class that
puts the method's layers into a model, the trainer's builder of the config, and the trainer hooks (AdaLoRA's
regularizer and rank allocation; no-ops for the others). Adding a method is one row here plus its own package;
adding a LoRA *variant* (like DoRA) is one module in :mod:`lorakit.variants` plus one row there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.adalora.config import AdaLoraConfig
from lorakit.adalora.train_method import AdaLoraHooks, build_adalora_config
from lorakit.adalora.tuner import AdaLoraModel
from lorakit.bottleneck.config import AdapterConfig
from lorakit.bottleneck.train_method import build_adapter_config as build_bottleneck_config
from lorakit.bottleneck.tuner import BottleneckModel
from lorakit.config import LoraConfig, PeftType, TaskType
from lorakit.tuner import LoraModel


class TrainerHooks:
    """What the trainer calls on a method at fixed points of a step; every hook does nothing by default."""

    def regularization_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss once per optimizer step, or None."""
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called after ``optimizer.step()`` and before ``zero_grad()`` (the gradients are still there)."""

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Extra training state to checkpoint (tensors), restored by :meth:`load_state` on resume."""
        return {}

    def load_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned."""


def build_lora_config(config: Any, target_modules: Any, total_steps: int) -> LoraConfig:
    """LoRA (and DoRA, rsLoRA, PiSSA / OLoRA / LoftQ inits) for the trainer's ``TrainConfig``."""
    init = {"true": True, "false": False}.get(config.init_lora_weights, config.init_lora_weights)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=target_modules,
        modules_to_save=config.modules_to_save,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora or config.method == "dora",
        init_lora_weights=init,
        loftq_config={"loftq_bits": 4, "loftq_iter": config.loftq_iter} if init == "loftq" else {},
    )


@dataclass(frozen=True)
class Method:
    """One adapter method (see the module docstring)."""

    name: str
    peft_type: PeftType
    config_class: type
    tuner_class: type
    build_config: Callable[[Any, Any, int], Any]
    hooks: TrainerHooks = field(default_factory=TrainerHooks)
    summary: str = ""


METHODS: tuple[Method, ...] = (
    Method("lora", PeftType.LORA, LoraConfig, LoraModel, build_lora_config, summary="LoRA (Hu et al. 2021)"),
    Method("dora", PeftType.LORA, LoraConfig, LoraModel, build_lora_config, summary="DoRA (Liu et al. 2024)"),
    Method(
        "adalora",
        PeftType.ADALORA,
        AdaLoraConfig,
        AdaLoraModel,
        build_adalora_config,
        hooks=AdaLoraHooks(),
        summary="AdaLoRA (Zhang et al. 2023)",
    ),
    Method(
        "adapter",
        PeftType.ADAPTER,
        AdapterConfig,
        BottleneckModel,
        build_bottleneck_config,
        summary="bottleneck Adapter (Houlsby et al. 2019)",
    ),
)


def method_names() -> tuple[str, ...]:
    return tuple(method.name for method in METHODS)


def method_named(name: str) -> Method:
    """The row for ``lorakit train --method name``; a ``ValueError`` listing the methods otherwise."""
    for method in METHODS:
        if method.name == name:
            return method
    raise ValueError(
        f"method '{name}' is not available in this lorakit build; use one of {', '.join(method_names())}."
    )


def method_for_type(peft_type: PeftType | str) -> Method:
    """The (first) row whose PEFT type is ``peft_type`` (``"LORA"``, ``"ADALORA"``, ...)."""
    value = getattr(peft_type, "value", peft_type)
    for method in METHODS:
        if method.peft_type.value == value:
            return method
    supported = ", ".join(dict.fromkeys(m.peft_type.value for m in METHODS))
    raise ValueError(f"adapter type {value!r} is not supported by lorakit (supported: {supported}).")


def hooks_of(model: nn.Module) -> TrainerHooks:
    """The trainer hooks of the method of ``model`` (a ``PeftModel``); no-op hooks for anything else."""
    configs = getattr(getattr(model, "base_model", None), "peft_config", None) or {}
    config = next(iter(configs.values()), None)
    return method_for_type(config.peft_type).hooks if config is not None else TrainerHooks()
