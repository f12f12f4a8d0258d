"""Optimizers for adapters: LoRA+ parameter groups.

LoRA+ (Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", sec. 3-4)
shows that with ``W + B A`` the two factors should not share a learning rate: in the wide-model
limit the update of ``B`` must be larger, ``lr_B = ratio * lr_A`` with ``ratio`` around 2^4.
Groups built here (parameter names follow the PEFT convention):

* ``lora_B`` matrices and 1-D adapter parameters (DoRA ``lora_magnitude_vector``, biases):
  ``lr * loraplus_lr_ratio``;
* every trainable parameter of a LoRA embedding layer (``lora_embedding_A`` / ``lora_embedding_B``
  live on the same layer): ``loraplus_lr_embedding`` — as the reference implementation and
  Hugging Face PEFT do;
* everything else (``lora_A`` ...): ``lr``.

Weight decay applies to matrices only; 1-D parameters (biases, norms, magnitudes) get none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EMBEDDING_ADAPTER_NAMES = ("lora_embedding_A", "lora_embedding_B")


def _is_embedding_adapter_layer(model: nn.Module, parameter_name: str) -> bool:
    """Whether ``<layer>.<dict>.<adapter>`` sits on a layer holding LoRA embedding factors."""
    prefix = ".".join(parameter_name.split(".")[:-2])
    if not prefix:
        return False
    try:
        layer = model.get_submodule(prefix)
    except AttributeError:
        return False
    return any(len(getattr(layer, name, ())) > 0 for name in EMBEDDING_ADAPTER_NAMES)


def loraplus_group_of(model: nn.Module, name: str, parameter: torch.Tensor) -> str:
    """'embedding', 'B' or 'A': which LoRA+ learning rate the parameter ``name`` gets."""
    if any(tag in name for tag in EMBEDDING_ADAPTER_NAMES) or _is_embedding_adapter_layer(model, name):
        return "embedding"
    if "lora_B" in name or parameter.ndim == 1:
        return "B"
    return "A"


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An ``optimizer_cls`` over the trainable parameters of ``model`` with LoRA+ learning rates.

    Returns an optimizer with up to six groups (A, B, embedding; each split into decayed matrices and
    undecayed 1-D tensors); empty groups are left out. Extra ``kwargs`` go to ``optimizer_cls``.
    """
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {loraplus_lr_ratio}.")
    group_lr = {"A": lr, "B": lr * loraplus_lr_ratio, "embedding": loraplus_lr_embedding}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decays = parameter.ndim >= 2
        buckets.setdefault((loraplus_group_of(model, name, parameter), decays), []).append(parameter)
    if not buckets:
        raise ValueError("The model has no trainable parameters; add an adapter first (get_peft_model).")
    groups = [
        {"params": params, "lr": group_lr[kind], "weight_decay": weight_decay if decays else 0.0}
        for (kind, decays), params in sorted(
            buckets.items(), key=lambda item: ("A", "B", "embedding").index(item[0][0])
        )
    ]
    return optimizer_cls(groups, lr=lr, **kwargs)


def create_adamw(
    model: nn.Module, lr: float, weight_decay: float = 0.0, **kwargs: Any
) -> torch.optim.Optimizer:
    """Plain AdamW over the trainable parameters; no weight decay on 1-D parameters."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    if not matrices and not vectors:
        raise ValueError("The model has no trainable parameters; add an adapter first (get_peft_model).")
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **kwargs)
