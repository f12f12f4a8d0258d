"""Data-parallel training with ``torch.distributed``: process group set-up, sums across ranks.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is one process and
every helper here is a no-op. Backend: NCCL when training on CUDA, gloo on CPU. Gradients are summed
manually over the trainable parameters (one flat buffer per step): the loop already divides each
rank's loss by the *global* number of trained tokens, so the sum is exactly the gradient of the mean
token loss over the global batch, whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorakit.train.config import ConfigError


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: rank among ``world_size`` and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local CUDA device when there is one, else CPU."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto."
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(preference: str = "auto") -> Distributed:
    """Join the process group described by the torchrun environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(context: Distributed) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Distributed) -> None:
    if context.enabled:
        dist.barrier()


def all_reduce_sum(context: Distributed, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (and return it)."""
    if context.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(context: Distributed, parameters: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``parameters`` over ranks through one flat buffer.

    A rank whose share of the batch was empty contributes zeros (its ``grad`` may be None).
    """
    if not context.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        count = grad.numel()
        parameter.grad = flat[offset : offset + count].view_as(grad).clone()
        offset += count


def gather_tensors(context: Distributed, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's ``tensors`` (same keys and shapes on all ranks), keyed ``rank<r>/<key>``."""
    if not context.enabled:
        return {f"rank0/{key}": value for key, value in tensors.items()}
    gathered: dict[str, torch.Tensor] = {}
    for key in sorted(tensors):
        local = tensors[key].to(context.device)
        parts = [torch.empty_like(local) for _ in range(context.world_size)]
        dist.all_gather(parts, local)
        for rank, part in enumerate(parts):
            gathered[f"rank{rank}/{key}"] = part.cpu()
    return gathered


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' progress bars (weight loading) turned off inside the block unless ``enabled``.

    Never turns them on (a user who disabled them keeps them off); the previous state returns after the block.
    """
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()
