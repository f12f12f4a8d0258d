"""The rank allocator: budget schedule against hand-computed values, importance EMAs against their formulas,
masking against chosen scores, and the behaviour the paper claims (more gradient -> more rank)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adalora import AdaLoraConfig, RankAllocator
from tests.adalora.helpers import LLAMA_KWARGS
from tests.conftest import tiny_llama


class TwoBranches(nn.Module):
    """``gain * strong(x) + weak(x) / gain``: the strong branch gets gain^2 times the weak one's gradients."""

    def __init__(self, gain: float = 10.0):
        super().__init__()
        torch.manual_seed(0)
        self.strong, self.weak, self.gain = nn.Linear(8, 8), nn.Linear(8, 8), gain

    def forward(self, x):
        return self.gain * self.strong(x) + self.weak(x) / self.gain


def _two_branch_model(**overrides):
    settings = dict(target_modules=["strong", "weak"], init_r=4, target_r=2, tinit=1, tfinal=2, total_step=10)
    return lorakit.get_peft_model(TwoBranches(), AdaLoraConfig(**(settings | overrides)))


def _expected_budget(step, b0=36, bT=12, tinit=2, tfinal=3, total=12):
    """Paper eq. 12 (with PEFT's integer truncation), written out independently."""
    if step <= tinit:
        return b0
    if step > total - tfinal:
        return bT
    return int(bT + (b0 - bT) * (1 - (step - tinit) / (total - tfinal - tinit)) ** 3)


def test_budget_schedule_values():
    model = lorakit.get_peft_model(tiny_llama(), AdaLoraConfig(**LLAMA_KWARGS))
    allocator = model.base_model.rank_allocator
    assert (allocator.init_budget, allocator.target_budget) == (36, 12)
    budgets = [allocator.budget_schedule(step) for step in range(0, 13)]
    # by hand: 24 * (6/7)^3 + 12 = 27.11, 24 * (5/7)^3 + 12 = 20.75, (4/7)^3 -> 16.48, (3/7)^3 -> 13.89, ...
    assert [b for b, _ in budgets] == [36, 36, 36, 27, 20, 16, 13, 12, 12, 12, 12, 12, 12]
    assert [b for b, _ in budgets] == [_expected_budget(s) for s in range(13)]
    # deltaT = 2 in the budgeting phase (step 9 = T - tfinal is forced by update_and_allocate), then final phase
    assert [m for _, m in budgets] == [False] * 3 + [False, True] * 3 + [False] + [True] * 3


def test_total_active_rank_follows_the_schedule():
    model = lorakit.get_peft_model(tiny_llama(), AdaLoraConfig(**dict(LLAMA_KWARGS, deltaT=1)))
    tuner = model.base_model
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    active_per_step = []
    for step in range(1, 13):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
        pattern = model.peft_config["default"].rank_pattern
        if pattern is None:
            active_per_step.append(None)
            continue
        active_per_step.append(sum(sum(flags) for flags in pattern.values()))
        for key, flags in pattern.items():  # E is zero exactly where the pattern prunes
            lora_E = tuner.model.get_submodule(key.removesuffix(".lora_E")).lora_E["default"].view(-1)
            assert ((lora_E != 0).tolist()) == flags, (step, key)
    assert active_per_step == [None, None] + [_expected_budget(step) for step in range(3, 13)]
    assert active_per_step == [None, None, 27, 20, 16, 13, 12, 12, 12, 12, 12, 12]


def test_layers_with_larger_gradients_keep_more_rank():
    model = _two_branch_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, 11):
        x, target = torch.randn(16, 8, generator=generator), torch.randn(16, 8, generator=generator)
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    pattern = model.peft_config["default"].rank_pattern
    strong, weak = sum(pattern["strong.lora_E"]), sum(pattern["weak.lora_E"])
    assert strong + weak == 4  # target_r 2 x 2 layers
    assert (strong, weak) == (4, 0)


def test_importance_emas_follow_their_formulas():
    model = _two_branch_model(beta1=0.7, beta2=0.6)
    allocator: RankAllocator = model.base_model.rank_allocator
    layer = model.base_model.model.strong
    generator = torch.Generator().manual_seed(0)
    history = []
    for _ in range(2):
        for param in (layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]):
            param.grad = torch.randn(param.shape, generator=generator)
        model.base_model.model.weak.zero_grad(set_to_none=False)
        for param in model.base_model.model.weak.parameters():
            param.grad = torch.zeros_like(param)
        allocator.update_importance()
        history.append((layer.lora_A["default"] * layer.lora_A["default"].grad).abs().detach().clone())
    first, second = history
    ema1 = 0.3 * first
    unc1 = 0.4 * (first - ema1).abs()
    ema2 = 0.7 * ema1 + 0.3 * second
    unc2 = 0.6 * unc1 + 0.4 * (second - ema2).abs()
    torch.testing.assert_close(allocator.sensitivity["strong.lora_A"], ema2)
    torch.testing.assert_close(allocator.uncertainty["strong.lora_A"], unc2)
    # triplet score i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki), s = sensitivity * uncertainty
    s = {
        f: allocator.sensitivity[f"strong.{f}"] * allocator.uncertainty[f"strong.{f}"]
        for f in ("lora_A", "lora_E", "lora_B")
    }
    for i in range(4):
        expected = s["lora_E"][i, 0] + s["lora_A"][i].sum() / 8 + s["lora_B"][:, i].sum() / 8
        torch.testing.assert_close(allocator.triplet_scores()["strong"][i], expected)


def test_mask_to_budget_prunes_the_lowest_scores():
    model = _two_branch_model()
    allocator = model.base_model.rank_allocator
    wanted = {"strong": [0.5, 0.1, 0.9, 0.3], "weak": [0.2, 0.8, 0.05, 0.7]}
    for path, values in wanted.items():
        layer = model.base_model.model.get_submodule(path)
        with torch.no_grad():
            layer.lora_E["default"].fill_(1.0)
        for factor in ("lora_A", "lora_E", "lora_B"):
            param = getattr(layer, factor)["default"]
            allocator.sensitivity[f"{path}.{factor}"] = torch.zeros_like(param)
            allocator.uncertainty[f"{path}.{factor}"] = torch.ones_like(param)
        allocator.sensitivity[f"{path}.lora_E"] = torch.tensor(values).view(-1, 1)
    pattern = allocator.mask_to_budget(budget=5)  # 8 triplets, prune the 3 lowest: 0.05, 0.1, 0.2
    assert pattern == {"strong.lora_E": [True, False, True, True], "weak.lora_E": [False, True, False, True]}
    assert model.base_model.model.strong.lora_E["default"].view(-1).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert model.base_model.model.weak.lora_E["default"].view(-1).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_update_and_allocate_needs_gradients():
    model = _two_branch_model()
    with pytest.raises(RuntimeError, match="after loss.backward"):
        model.update_and_allocate(1)


def test_allocator_state_round_trip():
    model = _two_branch_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 4):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        model.update_and_allocate(step)
        optimizer.zero_grad()
    state = model.allocator_state_dict()
    assert any(k.startswith("rank_pattern/") for k in state)
    fresh = _two_branch_model()
    fresh.load_allocator_state_dict(state)
    assert fresh.peft_config["default"].rank_pattern == model.peft_config["default"].rank_pattern
    for key, value in model.base_model.rank_allocator.sensitivity.items():
        torch.testing.assert_close(fresh.base_model.rank_allocator.sensitivity[key], value)
    with pytest.raises(ValueError, match="does not have"):
        fresh.load_allocator_state_dict({"nope.lora_A/sensitivity": torch.zeros(1)})
