"""PEFT's entry points besides ``get_peft_model``: injecting adapters into a plain model, and the mixed model.

* :func:`inject_adapter_in_model` puts the adapter layers into ``model`` itself, with no ``PeftModel`` around it
  (state-dict keys keep the model's own names: ``<path>.lora_A.default.weight``). The model gets a
  ``peft_config`` dict, so :func:`~lorakit.state_dict.get_peft_model_state_dict` and
  :func:`~lorakit.state_dict.set_peft_model_state_dict` work on it, as with PEFT.
* :class:`PeftMixedModel` is what ``get_peft_model(..., mixed=True)`` returns. PEFT's mixes adapters of different
  methods (LoRA with LoHa, LoKr, ...) on one model; lorakit's methods cannot be mixed, so it holds LoRA adapters
  only, and otherwise behaves as a :class:`~lorakit.peft_model.PeftModel` (which can also save, unlike PEFT's).
"""

from __future__ import annotations

from torch import nn

from lorakit.config import LoraConfig, PeftConfig
from lorakit.methods import method_for_type
from lorakit.peft_model import PeftModel
from lorakit.serialization import adapter_state_keys

MIXED_ONLY_LORA = (
    "lorakit's PeftMixedModel (get_peft_model(..., mixed=True)) holds plain LoRA adapters only: PEFT's mixed "
    "model combines different adapter methods on one model, which lorakit does not support. For {kind} use "
    "get_peft_model(model, config) without mixed=True; several LoRA adapters on one model need no mixed model "
    "either (add_adapter / load_adapter, then set_adapter([...]) or add_weighted_adapter)."
)


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict | None = None,
) -> nn.Module:
    """Inject the adapter layers of ``peft_config`` into ``model`` in place and return ``model`` (not wrapped).

    As in PEFT, only the adapters train afterwards (the new one becomes the layers' active adapter; adapters
    injected before keep their ``requires_grad``). ``low_cpu_mem_usage`` is accepted and changes nothing;
    ``state_dict`` (PEFT: choose targets from a checkpoint's keys) is not supported: set ``target_modules``.
    """
    if state_dict is not None:
        raise NotImplementedError(
            "inject_adapter_in_model(state_dict=...) is not supported by lorakit; set target_modules in the config."
        )
    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a lorakit config (LoraConfig, ...), got {type(peft_config).__name__}."
        )
    tuner_cls = method_for_type(peft_config.peft_type).tuner_class
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name in configs:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}.")
    adapter_keys = set(adapter_state_keys(model))
    before = [(p, p.requires_grad) for n, p in model.named_parameters() if n in adapter_keys]
    tuner = tuner_cls(model, peft_config, adapter_name)
    for param, flag in before:  # as in PEFT, adapters injected earlier keep training (or not) as before
        param.requires_grad_(flag)
    model.peft_config = {**(configs if isinstance(configs, dict) else {}), **tuner.peft_config}
    return model


def _check_lora(config: PeftConfig) -> None:
    if type(config) is not LoraConfig:
        raise NotImplementedError(MIXED_ONLY_LORA.format(kind=type(config).__name__))


class PeftMixedModel(PeftModel):
    """``get_peft_model(..., mixed=True)``: a PeftModel whose adapter operations take lists, LoRA adapters only."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs):
        _check_lora(peft_config)
        super().__init__(model, peft_config, adapter_name, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, *args, **kwargs) -> None:
        _check_lora(peft_config)
        super().add_adapter(adapter_name, peft_config, *args, **kwargs)

    def delete_adapter(self, adapter_name: str | list[str]) -> None:
        for name in [adapter_name] if isinstance(adapter_name, str) else list(adapter_name):
            super().delete_adapter(name)
