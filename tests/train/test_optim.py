"""LoRA+ parameter groups against Hugging Face PEFT's create_loraplus_optimizer."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer

from lorakit import LoraConfig, get_peft_model
from lorakit.optim import create_adamw, create_loraplus_optimizer

from .helpers import tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _lr_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: lr_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def _decay_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    wd_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    return {name: wd_of[id(p)] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True])
def test_loraplus_learning_rates_match_peft(use_dora: bool) -> None:
    ours = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, use_dora=use_dora))
    theirs = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=use_dora)
    )
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-5)
    our_lrs = _lr_by_name(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **kwargs))
    their_lrs = _lr_by_name(theirs, peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, **kwargs))
    assert our_lrs == their_lrs
    # The rule itself, independent of PEFT: B and 1-D at 16e-3, embedding factors at 1e-5, A at 1e-3.
    assert {lr for name, lr in our_lrs.items() if ".lora_B." in name} == {1e-3 * 16.0}
    assert {lr for name, lr in our_lrs.items() if "lora_embedding" in name} == {1e-5}
    assert {lr for name, lr in our_lrs.items() if ".lora_A." in name} == {1e-3}
    if use_dora:
        magnitudes = [lr for name, lr in our_lrs.items() if "lora_magnitude_vector" in name]
        assert magnitudes and set(magnitudes) == {1e-3 * 16.0}


def test_loraplus_weight_decay_only_on_matrices() -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    optimizer = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0, weight_decay=0.1
    )
    decay = _decay_by_name(model, optimizer)
    params = dict(model.named_parameters())
    assert all(decay[name] == (0.1 if params[name].ndim >= 2 else 0.0) for name in decay)
    assert any(value == 0.0 for value in decay.values()) and any(value == 0.1 for value in decay.values())


def test_loraplus_step_moves_b_sixteen_times_faster_than_a() -> None:
    """With SGD (no momentum) the first update of each tensor is exactly -lr * grad."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=16.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            lr = 0.16 if ".lora_B." in name else 0.01
            torch.testing.assert_close(parameter.detach(), before[name] - lr * grads[name], rtol=0, atol=1e-7)


def test_errors_without_trainable_parameters() -> None:
    model = tiny_llama()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=2.0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        create_adamw(model, lr=1e-3)
