"""The bottleneck Adapter (Houlsby et al. 2019): ``h + up(act(down(h)))`` after chosen modules.

Importing this package registers ``AdapterConfig`` with :func:`lorakit.config.load_config` and its tuner with
:func:`lorakit.peft_model.get_peft_model`. Adapters save and load in lorakit's own format (PEFT has no such
method) and cannot be merged (:class:`AdapterMergeError`).
"""

from lorakit.adapter.config import AdapterConfig
from lorakit.adapter.layers import AdapterLayer
from lorakit.adapter.train_method import build_adapter_config
from lorakit.adapter.tuner import HOULSBY_TARGETS, AdapterMergeError, AdapterModel, default_targets
from lorakit.config import PeftType, register_config_class
from lorakit.peft_model import register_tuner

register_config_class(AdapterConfig)
register_tuner(PeftType.ADAPTER, AdapterModel)

__all__ = [
    "build_adapter_config",
    "HOULSBY_TARGETS",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMergeError",
    "AdapterModel",
    "default_targets",
]
