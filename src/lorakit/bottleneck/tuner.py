"""``BottleneckModel``: a model with bottleneck Adapters inserted after chosen modules.

It offers the tuner interface :class:`~lorakit.peft_model.PeftModel` relies on (``peft_config``, add / set /
delete / disable adapters, ``unload``), and refuses to merge: a bottleneck Adapter is a nonlinear function of the
layer output, not a weight delta, so there is nothing to fold into the base weights.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator

from torch import nn

from lorakit.bottleneck.config import AdapterConfig
from lorakit.bottleneck.layers import BottleneckLayer, output_size
from lorakit.inject import (
    ModulesToSaveWrapper,
    get_submodule_parent,
    inject_modules_to_save,
    is_target,
    name_matches,
    save_wrappers,
)
from lorakit.layers import LoraLayer
from lorakit.tuner import BaseTuner, with_task_heads

# Houlsby et al. 2019 (fig. 2): one adapter after the attention output projection, one after the feed-forward.
HOULSBY_TARGETS: dict[str, list[str]] = {
    **{
        t: ["o_proj", "down_proj"]
        for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo")
    },
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "bert": ["attention.output.dense", "layer.\\d+.output.dense"],
    "roberta": ["attention.output.dense", "layer.\\d+.output.dense"],
    "opt": ["self_attn.out_proj", "fc2"],
    "gpt_neox": ["attention.dense", "mlp.dense_4h_to_h"],
}
_INTERNAL_PARTS = ("base_layer", "original_module", "modules_to_save")


class AdapterMergeError(ValueError):
    """Raised for merge requests: a bottleneck Adapter cannot be folded into the base weights."""


MERGE_MESSAGE = (
    "A bottleneck Adapter cannot be merged into the base weights: its output h + W_up act(W_down h) is a "
    "nonlinear function of the layer output, not a weight update, so it always runs as extra layers at "
    "inference. Use the adapter unmerged (PeftModel.from_pretrained), or train LoRA / DoRA / AdaLoRA if you "
    "need a merged model."
)


class BottleneckModel(BaseTuner):
    """A model with bottleneck Adapters; ``forward`` is the wrapped model's ``forward``."""

    prefix = "adapter_"

    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError(
            "Mixed-adapter batches (adapter_names) are supported for LoRA adapters only, not Adapters."
        )

    def adapter_layers(self) -> Iterator[tuple[str, BottleneckLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, BottleneckLayer):
                yield name, module

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Insert a new adapter after every target module; the active adapter does not change."""
        if not isinstance(config, AdapterConfig):
            raise ValueError(
                "All adapters on one model must be of the same method (here the bottleneck Adapter)."
            )
        self._check_new_adapter(adapter_name, config)
        config = copy.copy(with_task_heads(config))
        if config.target_modules is None:
            config.target_modules = default_targets(self.model)  # recorded in the saved config
        for name in find_adapter_targets(self.model, config):
            module = self.model.get_submodule(name)
            if not isinstance(module, BottleneckLayer):
                module = BottleneckLayer(module, name)
                parent, child = get_submodule_parent(self.model, name)
                setattr(parent, child, module)
            module.update_layer(
                adapter_name,
                config.bottleneck_size,
                config.non_linearity,
                config.adapter_dropout,
                config.init,
            )
        inject_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self._refresh_trainable()

    # ---------------------------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise AdapterMergeError(MERGE_MESSAGE)

    def unmerge_adapter(self) -> None:
        raise AdapterMergeError(MERGE_MESSAGE)

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        raise AdapterMergeError(MERGE_MESSAGE)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model (trained ``modules_to_save`` copies are kept)."""
        for name, layer in list(self.adapter_layers()):
            parent, child = get_submodule_parent(self.model, name)
            setattr(parent, child, layer.base_layer)
        for name, wrapper in list(save_wrappers(self.model)):
            parent, child = get_submodule_parent(self.model, name)
            setattr(parent, child, wrapper.active_module())
        return self.model


# ------------------------------------------------------------------------------------------------- targets
def default_targets(model: nn.Module) -> str:
    """Houlsby's placement for ``model``'s architecture (``config.model_type``), as a regex over module names."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in HOULSBY_TARGETS:
        known = ", ".join(sorted(HOULSBY_TARGETS))
        raise ValueError(
            f"target_modules is not set and lorakit has no default Adapter placement for model type "
            f"{model_type!r} (known: {known}). Name the modules after which adapters go, e.g. "
            f"target_modules=['o_proj', 'down_proj']."
        )
    return r".*\.(" + "|".join(HOULSBY_TARGETS[model_type]) + ")"


def _is_internal(name: str) -> bool:
    return any(p in _INTERNAL_PARTS or p.startswith(("lora_", "adapter_")) for p in name.split("."))


def _output_heads(model: nn.Module) -> set[str]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def find_adapter_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules an adapter goes after; raises with a helpful message if none or a wrong one."""
    if config.target_modules is None:
        config = copy.copy(config)
        config.target_modules = default_targets(model)
    heads, names = _output_heads(model), []
    candidates = [(n, m) for n, m in model.named_modules() if n and not _is_internal(n)]
    for name, module in candidates:
        if isinstance(module, ModulesToSaveWrapper) or not is_target(name, config, heads):
            continue
        base = module.base_layer if isinstance(module, (BottleneckLayer, LoraLayer)) else module
        if isinstance(module, LoraLayer):
            raise ValueError(
                f"{name!r} holds a LoRA adapter; a bottleneck Adapter cannot share a model with LoRA."
            )
        if config.target_modules == "all-linear":
            if isinstance(base, nn.Embedding) or output_size(base) is None:
                continue
        elif output_size(base) is None:
            # raises the TypeError that explains which layers an adapter can follow
            BottleneckLayer(base, name)
        names.append(name)
    if isinstance(config.target_modules, list):
        for target in config.target_modules:
            if not any(name_matches(n, [target]) for n, _ in candidates):
                raise ValueError(
                    f"Target module {target!r} matches no module of the model. {_examples(candidates)}"
                )
    if not names:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module of the model. {_examples(candidates)}"
        )
    return names


def _examples(candidates: list[tuple[str, nn.Module]]) -> str:
    names = []
    for name, module in candidates:
        short = name.split(".")[-1]
        if output_size(module) is not None and short not in names and not re.fullmatch(r"\d+", short):
            names.append(short)
    return f"Layers an adapter can follow here: {', '.join(names[:12]) or '(none)'}."
