"""lorakit: LoRA fine-tuning for PyTorch and Hugging Face transformers, with PEFT's API and file format."""

import os

from lorakit.adalora import AdaLoraConfig
from lorakit.bottleneck import AdapterConfig
from lorakit.config import LoftQConfig, LoraConfig, PeftConfig, PeftType, TaskType
from lorakit.lowrank import factorize
from lorakit.mapping import PeftMixedModel, inject_adapter_in_model
from lorakit.models import load_model, load_tokenizer
from lorakit.peft_model import PeftModel, get_peft_model
from lorakit.quant import quantize_model
from lorakit.saving import load_peft_weights
from lorakit.state_dict import (
    get_base_model_state_dict,
    get_peft_model_state_dict,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)

__version__ = "0.1.0"

if os.environ.get("LORAKIT_NO_HF_INTEGRATION", "") in ("", "0"):
    # transformers' Trainer, accelerate and TRL then treat lorakit models and configs as PEFT's (docs/integrations.md)
    from lorakit.integrations import enable_hf_integration

    enable_hf_integration()

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "LoftQConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "PeftType",
    "TaskType",
    "factorize",
    "get_base_model_state_dict",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "load_model",
    "load_peft_weights",
    "load_tokenizer",
    "quantize_model",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "__version__",
]
