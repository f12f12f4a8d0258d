"""AdaLoRA (Zhang et al. 2023): SVD-form updates whose ranks are allocated by importance during training.

Its row in :data:`lorakit.methods.METHODS` lets ``get_peft_model(model, AdaLoraConfig(...))`` and
``PeftModel.from_pretrained(model, folder)`` work for AdaLoRA adapters written by lorakit or PEFT, and gives the
trainer its hooks (:class:`~lorakit.adalora.train_method.AdaLoraHooks`).
"""

from lorakit.adalora.allocator import RankAllocator
from lorakit.adalora.config import AdaLoraConfig, adalora_config_for_run
from lorakit.adalora.layers import AdaLoraLayer, SVDConv2d, SVDLinear
from lorakit.adalora.train_method import build_adalora_config
from lorakit.adalora.tuner import AdaLoraModel

__all__ = [
    "build_adalora_config",
    "AdaLoraConfig",
    "AdaLoraLayer",
    "AdaLoraModel",
    "RankAllocator",
    "SVDConv2d",
    "SVDLinear",
    "adalora_config_for_run",
]
