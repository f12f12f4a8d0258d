"""AdaLoRA side by side with Hugging Face PEFT: same init + same steps -> same ranks, losses and logits;
files written by either library load in the other at their pruned size."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.adalora import AdaLoraConfig
from tests.adalora.helpers import LLAMA_KWARGS, SCHEDULE, logits, train, twins
from tests.conftest import tiny_gpt2, tiny_llama

ATOL = 1e-5


def _strip_adapter(pattern):
    return None if pattern is None else {k.removesuffix(".default"): v for k, v in pattern.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both libraries after the full 12-step schedule, and their saved folders."""
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1234))
    ours, theirs = twins()
    ours_run, theirs_run = train(ours, input_ids, 12), train(theirs, input_ids, 12)
    root = tmp_path_factory.mktemp("adalora")
    ours.save_pretrained(root / "ours")
    theirs.save_pretrained(root / "theirs")
    return dict(
        ours=ours, theirs=theirs, ours_run=ours_run, theirs_run=theirs_run, root=root, input_ids=input_ids
    )


def test_training_matches_peft_step_by_step(trained):
    ours_losses, ours_patterns = trained["ours_run"]
    theirs_losses, theirs_patterns = trained["theirs_run"]
    # the loss includes the orthogonality regularizer, so equal losses also check R(A, B)
    torch.testing.assert_close(torch.tensor(ours_losses), torch.tensor(theirs_losses), atol=ATOL, rtol=0)
    assert [p is None for p in ours_patterns] == [True, True, True] + [False] * 9  # first mask at step 4
    for ours_pattern, theirs_pattern in zip(ours_patterns, theirs_patterns):
        assert ours_pattern == _strip_adapter(theirs_pattern)
    assert sum(sum(flags) for flags in ours_patterns[-1].values()) == 6 * SCHEDULE["target_r"]
    # pruning really happened unevenly: the point of AdaLoRA
    assert len({sum(flags) for flags in ours_patterns[-1].values()}) > 1
    torch.testing.assert_close(
        logits(trained["ours"], trained["input_ids"]),
        logits(trained["theirs"], trained["input_ids"]),
        atol=ATOL,
        rtol=0,
    )


def test_saved_files_match_peft(trained):
    root = trained["root"]
    ours, theirs = (
        load_file(root / "ours/adapter_model.safetensors"),
        load_file(root / "theirs/adapter_model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    assert not any("ranknum" in key for key in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=ATOL, rtol=0, msg=key)
    ours_config = json.loads((root / "ours/adapter_config.json").read_text())
    theirs_config = json.loads((root / "theirs/adapter_config.json").read_text())
    assert ours_config["peft_type"] == "ADALORA"
    assert ours_config["rank_pattern"] == theirs_config["rank_pattern"]
    for key in (
        "init_r",
        "target_r",
        "tinit",
        "tfinal",
        "deltaT",
        "beta1",
        "beta2",
        "orth_reg_weight",
        "total_step",
    ):
        assert ours_config[key] == theirs_config[key], key
    # each layer is saved at its pruned size
    for module_key, flags in ours_config["rank_pattern"].items():
        assert ours[f"base_model.model.{module_key}"].shape == (sum(flags), 1)


def test_lorakit_adapter_loads_in_peft(trained):
    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=0), trained["root"] / "ours")
    input_ids = trained["input_ids"]
    torch.testing.assert_close(
        logits(loaded, input_ids), logits(trained["ours"], input_ids), atol=ATOL, rtol=0
    )
    assert (logits(loaded, input_ids) - logits(tiny_llama(seed=0), input_ids)).abs().max() > 1e-3


def test_peft_adapter_loads_in_lorakit_at_pruned_size(trained):
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(seed=0), trained["root"] / "theirs")
    input_ids = trained["input_ids"]
    torch.testing.assert_close(
        logits(loaded, input_ids), logits(trained["theirs"], input_ids), atol=ATOL, rtol=0
    )
    pattern = json.loads((trained["root"] / "theirs/adapter_config.json").read_text())["rank_pattern"]
    q_proj = loaded.base_model.model.model.layers[0].self_attn.q_proj
    flags = pattern["model.layers.0.self_attn.q_proj.lora_E"]
    assert q_proj.lora_A["default"].shape == (sum(flags), 32)
    assert q_proj.ranknum["default"].item() == SCHEDULE["init_r"]  # the scaling keeps the initial rank


def test_gpt2_conv1d_matches_peft(tmp_path, input_ids):
    kwargs = dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, **SCHEDULE)
    ours, theirs = twins(tiny_gpt2, **kwargs)
    assert train(ours, input_ids, 9)[0] == pytest.approx(train(theirs, input_ids, 9)[0], abs=ATOL)
    ours.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(seed=0), tmp_path)
    torch.testing.assert_close(logits(loaded, input_ids), logits(theirs, input_ids), atol=ATOL, rtol=0)


class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_conv2d_forward_and_merge_match_peft():
    kwargs = dict(target_modules=["conv", "head"], init_lora_weights=False, **SCHEDULE)
    theirs = peft.get_peft_model(TinyConvNet(), peft.AdaLoraConfig(**kwargs))
    ours = lorakit.get_peft_model(TinyConvNet(), AdaLoraConfig(**kwargs))
    with torch.no_grad():
        for name, param in ours.named_parameters():
            param.copy_(theirs.state_dict()[name])
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)
        assert (ours(x) - TinyConvNet()(x)).abs().max() > 1e-3
        torch.testing.assert_close(
            ours.merge_and_unload()(x), theirs.merge_and_unload()(x), atol=ATOL, rtol=0
        )


def test_merge_and_unload_matches_peft():
    kwargs = dict(LLAMA_KWARGS, init_lora_weights=False)
    ours, theirs = twins(**kwargs)
    input_ids = torch.arange(24).reshape(2, 12)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert not any("lora_" in name for name in merged_ours.state_dict())
    for (name, a), (_, b) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=name)
    torch.testing.assert_close(
        logits(merged_ours, input_ids), logits(merged_theirs, input_ids), atol=ATOL, rtol=0
    )


def test_parameter_counts_and_names_match_peft():
    ours, theirs = twins()
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


def test_importance_scores_match_peft_mid_budgeting(input_ids):
    ours, theirs = twins()
    train(ours, input_ids, 6)
    train(theirs, input_ids, 6)
    allocator, reference = ours.base_model.rank_allocator, theirs.base_model.rankallocator
    assert len(allocator.sensitivity) == len(reference.exp_avg_ipt) == 18  # 6 layers x (A, E, B)
    for key, value in allocator.sensitivity.items():
        torch.testing.assert_close(value, reference.exp_avg_ipt[f"{key}.default"], atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(
            allocator.uncertainty[key], reference.exp_avg_unc[f"{key}.default"], atol=1e-7, rtol=1e-4
        )
    assert (allocator.uncertainty["model.layers.0.self_attn.q_proj.lora_E"] > 0).all()
