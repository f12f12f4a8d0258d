"""Sharding the NF4 base with FSDP2 (``torch.distributed.fsdp.fully_shard``), keeping its 4.127 bits per weight.

FSDP2 shards a module's *parameters* along dim 0 across ranks and all-gathers them for the forward and backward of
the ``fully_shard``-ed module that owns them; *buffers* are replicated on every rank. A :class:`Linear4bit` keeps
its quantization state in buffers, so without help every rank would hold the whole 4-bit base.
:func:`make_shardable` re-registers each layer's 1-D, size-proportional state -- the packed codes ``weight_nf4``
(uint8), the double-quantized block constants ``absmax_codes`` (uint8) and their scales ``absmax_scales`` (fp32)
-- as frozen parameters (same tensors, names and ``state_dict``), which FSDP2 then shards like any other frozen
weight: the all-gather moves the stored bytes unchanged (mixed uint8/fp32 groups are gathered as bytes), so the
per-rank resident base is about ``4.127 / world_size`` bits per weight and the decoded values are bit-identical
to one process. The 4-byte ``absmax_offset`` and the 64-byte NF4 table stay replicated buffers.

Order of operations: ``quantize_model`` -> ``get_peft_model`` -> :func:`make_shardable` -> ``fully_shard`` each
block, then the root. Use no ``MixedPrecisionPolicy(param_dtype=...)`` on groups holding 4-bit layers (it would
cast the fp32 scales); each layer decodes to its own ``compute_dtype``. Outside the forward of the FSDP module
that owns a layer, its state is a ``DTensor`` shard and ``dequantize()`` (merging, ``to_linear``) raises; call
``unshard()`` on that FSDP module (all ranks) first and ``reshard()`` after.

:func:`resident_weight_bytes` reports the frozen-weight bytes a process actually holds, to show the saving.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.quant.linear4bit import Linear4bit, _is_dtensor

__all__ = ["make_shardable", "resident_weight_bytes"]


def make_shardable(model: nn.Module) -> int:
    """Make every :class:`Linear4bit` in ``model`` shardable by FSDP2; returns how many layers were converted.

    Calls :meth:`Linear4bit.to_shardable` on each (layers already converted are skipped, so calling it twice is
    harmless): ``weight_nf4``, ``absmax_codes`` and ``absmax_scales`` become frozen ``nn.Parameter``s under their
    own names. Outputs, ``state_dict`` keys and values are unchanged; the model works the same without FSDP. Run it
    before ``fully_shard`` (parameters registered afterwards would not be sharded). Works on a PEFT-wrapped model.
    """
    return sum(layer.to_shardable() for layer in model.modules() if isinstance(layer, Linear4bit))


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of frozen weights this process holds for ``model``: the per-rank memory of the (4-bit) base.

    Counts every parameter with ``requires_grad=False`` and every buffer, in memory as held here: the local shard
    of a ``DTensor`` (FSDP2), the tensor itself otherwise. Each storage is counted once and whole, so tied weights
    count once and FSDP's padding of the last shard is included. Trainable parameters (adapters), gradients,
    optimizer states and tensors on the ``meta`` device (no data) are not counted.
    """
    tensors = [param for param in model.parameters() if not param.requires_grad]
    tensors += list(model.buffers())
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if _is_dtensor(tensor) else tensor
        if local.device.type == "meta":
            continue
        storage = local.untyped_storage()
        key = (local.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
