"""Everything a run needs before its first step: seeds, model, tokenizer, adapter, optimizer, plan."""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lorakit.models import load_model, load_tokenizer
from lorakit.optim import create_adamw, create_loraplus_optimizer
from lorakit.train.batching import steps_per_epoch
from lorakit.train.config import TrainConfig
from lorakit.train.config_checks import check_against_model
from lorakit.train.schedule import resolve_warmup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Plan:
    """How many optimizer steps the run makes and how many examples each consumes."""

    num_examples: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def make_plan(config: TrainConfig, num_examples: int, world_size: int) -> Plan:
    global_batch = config.micro_batch_size * config.gradient_accumulation_steps * world_size
    per_epoch = steps_per_epoch(num_examples, global_batch)
    total = config.max_steps or max(1, math.ceil(config.num_epochs * per_epoch))
    return Plan(
        num_examples,
        global_batch,
        per_epoch,
        total,
        resolve_warmup(total, config.warmup_steps, config.warmup_ratio),
    )


def seed_everything(seed: int) -> None:
    """Seed every global generator; on CPU, also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def load_base(config: TrainConfig, device: torch.device) -> tuple[nn.Module, object]:
    """The base model (fp32 weights, or 4-bit Linear layers for QLoRA) and its tokenizer.

    Under ``distributed: fsdp`` the model stays in host memory: ``fully_shard`` then moves only this rank's
    shards to its GPU, so no GPU ever holds the whole model.
    """
    if config.distributed == "fsdp":
        device = torch.device("cpu")
    tokenizer = load_tokenizer(config.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(
        config.model,
        dtype=torch.float32,
        # LoftQ quantizes the layers it adapts itself, from their full-precision weights (attach_adapter)
        load_in_4bit=config.load_in_4bit and config.init_lora_weights != "loftq",
        compute_dtype=DTYPES[config.compute_dtype],
        device=device,
    )
    check_against_model(config, getattr(model, "config", None))
    model.to(device)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def quantize_outside_targets(model: nn.Module, adapter_config: Any, compute_dtype: torch.dtype) -> None:
    """QLoRA with LoftQ: quantize every Linear to 4-bit NF4 except the output head and the adapter's targets,
    which LoftQ quantizes itself, jointly with their A and B, when the adapter is added."""
    from lorakit.inject import find_targets
    from lorakit.quant import quantize_model

    targets = find_targets(model, adapter_config)
    quantize_model(model, compute_dtype=compute_dtype, skip_modules=["lm_head", *targets])


PISSA_NITER_SEED = 20240404  # the generator state of randomized-SVD PiSSA inits in lorakit's commands


@contextlib.contextmanager
def reproducible_init(init: Any) -> Iterator[None]:
    """``pissa_niter_K`` draws its randomized SVD from the global generator, and reloading an adapter re-runs the
    init to rebuild the residual base weights: training and the inference commands therefore run it from the
    same fixed generator state (and leave the caller's state as it was). Other inits are untouched."""
    if not str(init).startswith("pissa_niter_"):
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PISSA_NITER_SEED)
        yield


def set_quantized_compute_dtype(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """The compute dtype of every 4-bit layer (LoftQ makes its layers in the base weights' dtype)."""
    from lorakit.quant import quantized_layers

    for layer in quantized_layers(model).values():
        layer.compute_dtype = compute_dtype


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, list[float]]:
    """AdamW (LoRA+ groups when ``loraplus_lr_ratio`` is set); returns it with each group's peak lr."""
    adam = dict(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon, foreach=False)
    if config.loraplus_lr_ratio:
        optimizer = create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=config.learning_rate,
            loraplus_lr_ratio=config.loraplus_lr_ratio,
            loraplus_lr_embedding=config.loraplus_lr_embedding,
            weight_decay=config.weight_decay,
            **adam,
        )
    else:
        optimizer = create_adamw(model, lr=config.learning_rate, weight_decay=config.weight_decay, **adam)
    return optimizer, [group["lr"] for group in optimizer.param_groups]


def autocast_context(precision: str, device: torch.device) -> torch.autocast:
    """Mixed precision for bf16/fp16 (weights stay fp32); a disabled context for fp32."""
    dtype = DTYPES[precision]
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "fp32")
