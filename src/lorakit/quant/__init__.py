"""QLoRA's quantization layer: frozen NF4 base weights that LoRA trains on (Dettmers et al. 2023).

``quantize_model(model)`` swaps the model's Linear layers for :class:`Linear4bit` (NF4 codes, double-quantized
block constants, block-wise dequantization in the compute dtype for forward and backward); LoRA/DoRA adapters
then wrap those layers unchanged. See docs/qlora.md. For FSDP2, :func:`make_shardable` lets ``fully_shard`` shard
the 4-bit base too (see :mod:`lorakit.quant.fsdp`).
"""

from lorakit.quant.fsdp import make_shardable, resident_weight_bytes
from lorakit.quant.linear4bit import Linear4bit, QuantizedWeight
from lorakit.quant.nf4 import (
    NF4Tensor,
    dequantize_nf4_range,
    dynamic_code_table,
    nf4_code_table,
    nf4_storage_bytes,
    quantize_nf4,
)
from lorakit.quant.replace import dequantize_model, quantize_model, quantized_layers, resolve_compute_dtype

__all__ = [
    "Linear4bit",
    "NF4Tensor",
    "QuantizedWeight",
    "dequantize_model",
    "dequantize_nf4_range",
    "dynamic_code_table",
    "make_shardable",
    "nf4_code_table",
    "nf4_storage_bytes",
    "quantize_model",
    "quantize_nf4",
    "quantized_layers",
    "resident_weight_bytes",
    "resolve_compute_dtype",
]
