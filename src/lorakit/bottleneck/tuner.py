"""``BottleneckModel``: a model with bottleneck Adapters inserted after chosen modules.

It offers the tuner interface :class:`~lorakit.peft_model.PeftModel` relies on (``peft_config``, add / set /
delete / disable adapters, ``unload``), and refuses to merge: a bottleneck Adapter is a nonlinear function of the
layer output, not a weight delta, so there is nothing to fold into the base weights.
"""

from __future__ import annotations

import copy

from torch import nn

from lorakit.bottleneck.config import AdapterConfig
from lorakit.bottleneck.layers import BottleneckLayer, unsupported_message
from lorakit.inject import LayerFactory, inject_adapter, inject_modules_to_save, replace_with_base
from lorakit.layer_kinds import output_size
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
        inject_adapter(self.model, config, adapter_name, BOTTLENECK_LAYERS)
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
        return replace_with_base(self.model, merge=False)


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


BOTTLENECK_LAYERS = LayerFactory(
    layer_class=BottleneckLayer,
    supports=lambda module: output_size(module) is not None,
    wrap=lambda module, name, config: BottleneckLayer(module, name),
    add=lambda layer, adapter_name, name, config: layer.update_layer(
        adapter_name, config.bottleneck_size, config.non_linearity, config.adapter_dropout, config.init
    ),
    unsupported=unsupported_message,
    all_linear=lambda module: output_size(module) is not None and not isinstance(module, nn.Embedding),
)
