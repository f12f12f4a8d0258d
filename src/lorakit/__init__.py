"""lorakit: LoRA fine-tuning for PyTorch and Hugging Face transformers, with PEFT's API and file format."""

from lorakit.adalora import AdaLoraConfig
from lorakit.adapter import AdapterConfig
from lorakit.config import LoraConfig, PeftType, TaskType
from lorakit.lowrank import factorize
from lorakit.models import load_model, load_tokenizer
from lorakit.peft_model import PeftModel, get_peft_model
from lorakit.quant import quantize_model

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig",
    "AdapterConfig",
    "LoraConfig",
    "PeftModel",
    "PeftType",
    "TaskType",
    "factorize",
    "get_peft_model",
    "load_model",
    "load_tokenizer",
    "quantize_model",
    "__version__",
]
