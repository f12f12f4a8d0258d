"""Shared pieces of the AdaLoRA tests: configs, PEFT twins with identical weights, a short training loop."""

from __future__ import annotations

import peft
import torch

import lorakit
from lorakit.adalora import AdaLoraConfig
from tests.conftest import tiny_llama

# 6 layers x init_r 6 = 36 triplets at start, 6 x target_r 2 = 12 at the end; budgeting at steps 3..8.
SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12, deltaT=2)
LLAMA_KWARGS = dict(
    task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=8, **SCHEDULE
)


def twins(builder=tiny_llama, **kwargs):
    """(lorakit model, PEFT model) on identical base models with identical initial adapter weights."""
    kwargs = kwargs or LLAMA_KWARGS
    theirs = peft.get_peft_model(builder(seed=0), peft.AdaLoraConfig(**kwargs))
    ours = lorakit.get_peft_model(builder(seed=0), AdaLoraConfig(**kwargs))
    copy_adapter_weights(theirs, ours)
    return ours, theirs


def copy_adapter_weights(source, target) -> None:
    """Copy every parameter by name (both libraries name AdaLoRA parameters alike)."""
    state = source.state_dict()
    with torch.no_grad():
        for name, param in target.named_parameters():
            param.copy_(state[name])


def train(model, input_ids, steps: int, lr: float = 2e-2, allocate: bool = True):
    """AdamW steps on the LM loss (which includes the orthogonality term); returns losses and rank patterns."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(0)  # the base model's own dropout (GPT-2) draws the same masks in both libraries
    model.train()
    losses, patterns = [], []
    for step in range(1, steps + 1):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        if allocate:
            model.update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
        pattern = model.peft_config["default"].rank_pattern
        patterns.append(None if pattern is None else {k: list(v) for k, v in pattern.items()})
    model.eval()
    return losses, patterns


def logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits
