"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): ``distributed: fsdp``.

Each decoder block (the model's ``_no_split_modules``) and then the root model are ``fully_shard``-ed over all
ranks, so every parameter -- the frozen base, the 4-bit NF4 base (made shardable by
:func:`lorakit.quant.fsdp.make_shardable`) and the adapters -- is held as a ``DTensor`` with 1/world_size of
its rows per rank, all-gathered for a block's forward and backward only. Gradients are reduce-scattered with a
divide factor of 1: the loop already divides each rank's loss by the *global* number of trained tokens, so the
sum is exactly the gradient of the mean token loss over the global batch, as with DDP. AdamW's states are
sharded like their parameters.

Everything that leaves the process goes through full tensors, gathered on every rank (collectives) and written by
rank 0, so checkpoints and adapters are the same files as without FSDP: :func:`full_state` for the trainable
parameters, :func:`full_optimizer_state` for AdamW, and :func:`copy_full_into` / :func:`shard_optimizer_state` to
load them back into the shards on resume.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.distributed import Distributed

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return None
    return DTensor


def is_dtensor(tensor: Any) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` (or one of its modules)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def check_config(config: TrainConfig, context: Distributed) -> None:
    """Refuse the combinations FSDP2 does not support here, each with the fix."""
    if config.distributed != "fsdp":
        return
    if config.method == "adalora":
        raise ConfigError(
            "method: adalora does not run under distributed: fsdp (its rank allocator reads and prunes whole "
            "singular-value vectors); use distributed: ddp, or method lora / dora."
        )
    if config.precision == "fp16":
        raise ConfigError("precision: fp16 is not supported with distributed: fsdp; use bf16 (or fp32).")
    if config.fsdp_cpu_offload and context.device.type != "cuda":
        raise ConfigError(
            "fsdp_cpu_offload keeps sharded parameters in host memory while training on a GPU; this run is on "
            "the CPU already. Drop fsdp_cpu_offload."
        )
    if config.compile:
        raise ConfigError("compile is not supported with distributed: fsdp yet; drop compile.")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the classes in the model's ``_no_split_modules`` (transformers),
    else the children of its longest ``nn.ModuleList``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [module for module in base.modules() if type(module).__name__ in names]
    if blocks:
        return blocks
    lists = [module for module in base.modules() if isinstance(module, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, config: TrainConfig, context: Distributed) -> str:
    """``fully_shard`` every decoder block, then the root model; returns a line for the log with the frozen
    weight bytes this rank holds before and after (:func:`lorakit.quant.resident_weight_bytes`).

    Mixed precision: ``precision: bf16`` all-gathers the parameters in bf16 and reduces gradients in fp32
    (FSDP2's ``MixedPrecisionPolicy``), except over a 4-bit base, whose packed codes and scales must not be
    cast (its layers decode to their own compute dtype; the run's autocast still applies).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    from lorakit.quant import quantized_layers, resident_weight_bytes

    before = resident_weight_bytes(model)

    if quantized_layers(model):  # QLoRA (or LoftQ): the packed NF4 storage becomes shardable parameters
        from lorakit.quant.fsdp import make_shardable

        make_shardable(model)
    mixed = config.precision in DTYPES and not config.load_in_4bit
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[config.precision] if mixed else None, reduce_dtype=torch.float32 if mixed else None
    )
    offload = CPUOffloadPolicy() if config.fsdp_cpu_offload else OffloadPolicy()
    mesh = init_device_mesh(context.device.type, (context.world_size,))
    blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    # the root is the wrapped transformers model, not the PeftModel: generate() calls it, not the wrapper
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, mesh=mesh, mp_policy=policy, offload_policy=offload)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # a sum: the loss is already divided by the global tokens
            module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    after = resident_weight_bytes(model)
    return (
        f"fsdp: {len(blocks)} blocks and the root sharded over {context.world_size} process(es); frozen weights "
        f"held by this rank: {_size(after)} of {_size(before)} ({after / max(before, 1):.1%})"
    )


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.1f} KiB"


# -------------------------------------------------------------------------------------- full tensors
def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a ``DTensor`` (a collective: every rank calls it), or the tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def reshard(model: nn.Module) -> None:
    """Put every FSDP module back in its sharded state, on every rank.

    The root keeps its parameters gathered after a forward (FSDP2's default for the root), and reading the
    model's ``state_dict`` (rank 0 does, to save) reshards them on that rank only: the next forward would then
    all-gather on one rank and not on the other. Resharding everywhere first keeps the ranks in step.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name as whole tensors on CPU (every rank calls it under FSDP)."""
    reshard(model)
    return {
        name: full_tensor(param.detach()).cpu().contiguous().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (every rank calls it)."""
    state_dict = optimizer.state_dict()
    state = {
        index: {
            key: full_tensor(value).detach().cpu() if isinstance(value, torch.Tensor) else value
            for key, value in per_param.items()
        }
        for index, per_param in state_dict["state"].items()
    }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def local_part(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``full`` for a ``DTensor`` parameter (no communication: every rank has ``full``)."""
    from torch.distributed.tensor import distribute_tensor

    full = full.detach().to(device=param.device, dtype=param.dtype)
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)`` for a plain or a sharded parameter."""
    with torch.no_grad():
        if is_dtensor(param):
            param.to_local().copy_(local_part(param, full).to_local())
        else:
            param.copy_(full.to(param.device, param.dtype))


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A full ``state_dict`` made loadable into ``optimizer`` over sharded parameters: each state tensor shaped
    like its ``DTensor`` parameter becomes that parameter's shard (scalars such as AdamW's ``step`` stay)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, per_param in state_dict["state"].items():
        param = params[int(index)]
        state[index] = {
            key: local_part(param, value)
            if is_dtensor(param) and isinstance(value, torch.Tensor) and value.shape == param.shape
            else value
            for key, value in per_param.items()
        }
    return {"state": state, "param_groups": state_dict["param_groups"]}


def gathered_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """:func:`full_state` when ``model`` is sharded (every rank must call this), else None (nothing to gather)."""
    return full_state(model) if is_sharded(model) else None


def adapter_save_kwargs(trainable: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """``save_pretrained`` arguments: the gathered tensors of a sharded model (its modules hold shards)."""
    return {} if trainable is None else {"state_dict": trainable}


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor (the shard of a ``DTensor``)."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]
