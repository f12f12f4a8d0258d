"""AdaLoRA (Zhang et al. 2023): SVD-form updates whose ranks are allocated by importance during training.

Importing this package registers ``AdaLoraConfig`` with :func:`lorakit.config.load_config` and its tuner with
:func:`lorakit.peft_model.get_peft_model`, so ``get_peft_model(model, AdaLoraConfig(...))`` and
``PeftModel.from_pretrained(model, folder)`` work for AdaLoRA adapters written by lorakit or PEFT.
"""

from lorakit.adalora.allocator import RankAllocator
from lorakit.adalora.config import AdaLoraConfig, adalora_config_for_run
from lorakit.adalora.layers import AdaLoraLayer, SVDConv2d, SVDLinear
from lorakit.adalora.train_method import build_adalora_config
from lorakit.adalora.tuner import AdaLoraModel
from lorakit.config import PeftType, register_config_class
from lorakit.peft_model import register_tuner

register_config_class(AdaLoraConfig)
register_tuner(PeftType.ADALORA, AdaLoraModel)

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
