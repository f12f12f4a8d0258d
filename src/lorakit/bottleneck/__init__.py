"""The bottleneck Adapter (Houlsby et al. 2019): ``h + up(act(down(h)))`` after chosen modules.

``BottleneckLayer`` wraps one module, ``BottleneckModel`` is the tuner; the config keeps its public name
``AdapterConfig`` (also importable as ``BottleneckConfig``) and the saved ``peft_type`` stays
``"BOTTLENECK_ADAPTER"``, so existing code and adapter folders keep working.

Its row in :data:`lorakit.methods.METHODS` (``method: adapter`` in the trainer) makes ``get_peft_model`` and
``PeftModel.from_pretrained`` handle it. Adapters save and load in lorakit's own format (PEFT has no such
method) and cannot be merged (:class:`AdapterMergeError`).
"""

from lorakit.bottleneck.config import AdapterConfig, BottleneckConfig
from lorakit.bottleneck.layers import BottleneckLayer
from lorakit.bottleneck.train_method import build_adapter_config
from lorakit.bottleneck.tuner import HOULSBY_TARGETS, AdapterMergeError, BottleneckModel, default_targets

__all__ = [
    "build_adapter_config",
    "HOULSBY_TARGETS",
    "AdapterConfig",
    "BottleneckConfig",
    "BottleneckLayer",
    "AdapterMergeError",
    "BottleneckModel",
    "default_targets",
]
