"""``LoraModel``: the user's model with LoRA layers injected, and the operations over all its adapters.

It holds the user's model as ``.model`` (so parameter names read ``base_model.model.<path>`` under a
:class:`~lorakit.peft_model.PeftModel`, exactly as in PEFT) and one config per adapter name.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.config import TASK_HEAD_MODULES, LoraConfig
from lorakit.inject import (
    inject_adapter,
    inject_modules_to_save,
    lora_layers,
    replace_with_base,
    save_wrappers,
)
from lorakit.layers import LoraLayer
from lorakit.lora_ops import shared_dropout_scope

BASE_ADAPTER = "__base__"


def _is_checkpointing(model: nn.Module) -> bool:
    for attribute in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers v5, v4
        if hasattr(type(model), attribute):
            return bool(getattr(model, attribute))
    return False


def with_task_heads(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` whose modules_to_save also holds the heads its task trains from scratch."""
    heads = TASK_HEAD_MODULES.get(config.task_type, [])
    if not heads:
        return config
    config = copy.copy(config)
    config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
    return config


class BaseTuner(nn.Module):
    """What every adapter method shares: the wrapped ``model``, its configs by adapter name, which adapters are
    active, and adding / switching / deleting / disabling them. A method supplies ``add_adapter`` and
    ``adapter_layers`` (its wrapper modules, each with ``set_adapter``, ``delete_adapter``, ``disable_adapters``).
    """

    prefix = ""  # parameter-name prefix of the method's adapter weights

    def __init__(self, model: nn.Module, config, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict = {}
        self.active_adapter: str | list[str] = adapter_name
        self.add_adapter(adapter_name, config)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        # Dropout masks are drawn only in training with autograd: only then is the sharing scope needed (and
        # the checkpointing test, which walks every module, is worth its cost).
        training = self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        sharing = training and not _is_checkpointing(self.model)
        scope = shared_dropout_scope() if sharing else contextlib.nullcontext()
        batch = contextlib.nullcontext() if adapter_names is None else self.mixed_batch(adapter_names)
        with scope, batch:
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def add_adapter(self, adapter_name: str, config) -> None:
        raise NotImplementedError

    def adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        raise NotImplementedError

    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError(f"Mixed-adapter batches (adapter_names) are not supported by {type(self).__name__}.")

    # --------------------------------------------------------------------------------------------- adapters
    @property
    def active_adapters(self) -> list[str]:
        active = self.active_adapter
        return [active] if isinstance(active, str) else list(active)

    def _check_new_adapter(self, adapter_name: str, config) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name.")
        if self.peft_config and type(config) is not type(next(iter(self.peft_config.values()))):
            raise ValueError("All adapters on one model must be of the same method (e.g. all LoRA).")

    def _refresh_trainable(self) -> None:
        """Freeze everything, then let the active adapters (and the biases their config asks for) train."""
        configs = [self.peft_config[a] for a in self.active_adapters if a in self.peft_config]
        bias = getattr(configs[0], "bias", "none") if configs else "none"
        for param in self.model.parameters():
            param.requires_grad_(False)
        for _, layer in self.adapter_layers():
            layer.set_adapter(self.active_adapters)
            base_bias = getattr(getattr(layer, "base_layer", None), "bias", None)
            if bias == "lora_only" and isinstance(base_bias, nn.Parameter):
                base_bias.requires_grad_(True)
        if bias == "all":
            for name, param in self.model.named_parameters():
                if (
                    name.endswith("bias")
                    and f".{self.prefix}" not in name
                    and ".original_module." not in name
                ):
                    param.requires_grad_(True)
        for _, wrapper in save_wrappers(self.model):
            wrapper.set_adapter(self.active_adapters)
        if any(c.inference_mode for c in configs):
            for param in self.model.parameters():
                param.requires_grad_(False)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter, or several whose outputs add up; only active adapters train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; existing: {list(self.peft_config)}.")
        self.active_adapter = adapter_name
        self._refresh_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; existing: {list(self.peft_config)}.")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in save_wrappers(self.model):
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
        if self.peft_config:
            self.set_adapter(self.active_adapter)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block (merged adapters are unmerged first)."""
        wrappers = [m for _, m in self.adapter_layers()] + [m for _, m in save_wrappers(self.model)]
        for module in wrappers:
            module.disable_adapters = True
        try:
            yield
        finally:
            for module in wrappers:
                module.disable_adapters = False


class LoraModel(BaseTuner):
    """A model with LoRA adapters; ``forward`` is the wrapped model's ``forward``."""

    prefix = "lora_"

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter; the active adapter does not change (as in PEFT)."""
        config = with_task_heads(config)
        self._check_new_adapter(adapter_name, config)
        inject_adapter(self.model, config, adapter_name)
        inject_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self._refresh_trainable()

    def adapter_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        return lora_layers(self.model)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside the block, batch row ``i`` uses adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"Unknown adapter(s) {unknown} in adapter_names; existing: {list(self.peft_config)} "
                f"(or {BASE_ADAPTER!r} for the base model)."
            )
        layers = [layer for _, layer in lora_layers(self.model)]
        rows = tuple(adapter_names)
        for layer in layers:
            layer.row_adapters = rows
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

    # ---------------------------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or named) adapters into the base weights, keeping the LoRA layers."""
        for _, layer in lora_layers(self.model):
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, layer in lora_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the active (or named) adapters and return the plain model, with no LoRA module left."""
        if adapter_names is not None:
            for _, layer in lora_layers(self.model):
                layer.active_adapters = [n for n in adapter_names if n in layer.r]
        return replace_with_base(self.model, merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model."""
        return replace_with_base(self.model, merge=False)
