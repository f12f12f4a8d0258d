"""inspect / read_adapter side by side with Hugging Face PEFT on adapters PEFT saved itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.lowrank import compare_adapters, inspect_adapter, read_adapter

from .adapter_builders import peft_deltas, save_peft_adapter, tiny_llama

peft = pytest.importorskip("peft")


def assert_matches_peft(folder, peft_model, transpose_fan_in_fan_out=False):
    expected = peft_deltas(peft_model)
    layers = {layer.name: layer for layer in read_adapter(folder).layers}
    assert sorted(layers) == sorted(expected)
    for name, delta in expected.items():
        ours = layers[name].delta()
        reference = delta.numpy().T if transpose_fan_in_fan_out else delta.numpy()
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6, err_msg=name)
    report = {layer.name: layer for layer in inspect_adapter(folder).layers}
    for name, delta in expected.items():
        sigma = torch.linalg.svdvals(delta).numpy()[: report[name].rank]
        np.testing.assert_allclose(
            report[name].stats.singular_values, sigma, rtol=1e-5, atol=1e-6, err_msg=name
        )
    return report


def test_lora_with_patterns_rslora_and_embeddings(tmp_path):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 3},
        alpha_pattern={"down_proj": 5},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft_model = save_peft_adapter(tmp_path, tiny_llama(), config)
    report = assert_matches_peft(tmp_path, peft_model)
    assert report["model.layers.0.self_attn.v_proj"].rank == 2
    assert report["model.layers.1.self_attn.q_proj"].rank == 3
    assert report["model.layers.0.mlp.down_proj"].scaling == pytest.approx(5 / 2)  # rsLoRA: alpha / sqrt(4)
    assert report["model.embed_tokens"].kind == "embedding"
    # Random full-rank factors: every stored rank is used.
    assert all(layer.stats.numerical_rank == layer.rank for layer in report.values())


def test_dora(tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, init_lora_weights=False
    )
    report = assert_matches_peft(tmp_path, save_peft_adapter(tmp_path, tiny_llama(), config))
    assert all(any("DoRA" in note for note in layer.notes) for layer in report.values())


def test_adalora(tmp_path):
    config = peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=16, target_modules=["q_proj"], total_step=10)
    peft_model = save_peft_adapter(tmp_path, tiny_llama(), config)
    for module in peft_model.modules():  # PEFT initialises lora_E to zero; make the update non-zero
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            torch.nn.init.normal_(module.lora_E["default"])
    peft_model.save_pretrained(str(tmp_path))
    assert_matches_peft(tmp_path, peft_model)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=32))
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False
    )
    peft_model = save_peft_adapter(tmp_path, model, config)
    # PEFT returns Conv1D deltas in the (in, out) storage layout; lorakit reports the (out, in) map.
    assert_matches_peft(tmp_path, peft_model, transpose_fan_in_fan_out=True)


def test_conv2d(tmp_path):
    class TinyConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, kernel_size=3)

        def forward(self, x):
            return self.conv(x)

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["conv"], init_lora_weights=False)
    peft_model = save_peft_adapter(tmp_path, TinyConvNet(), config)
    expected = peft_deltas(peft_model)["conv"].reshape(5, -1).numpy()
    (layer,) = read_adapter(tmp_path).layers
    assert layer.kind == "conv"
    np.testing.assert_allclose(layer.delta(), expected, rtol=1e-5, atol=1e-6)


def test_compare_two_seeds_and_itself(tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    save_peft_adapter(tmp_path / "a", tiny_llama(), config, seed=1)
    save_peft_adapter(tmp_path / "b", tiny_llama(), config, seed=2)
    itself = compare_adapters(tmp_path / "a", tmp_path / "a")
    for layer in itself.layers:
        np.testing.assert_allclose(layer.grid, np.ones((4, 4)), atol=1e-6)
    forward = compare_adapters(tmp_path / "a", tmp_path / "b")
    backward = compare_adapters(tmp_path / "b", tmp_path / "a")
    assert len(forward.layers) == 4
    for layer_ab, layer_ba in zip(forward.layers, backward.layers):
        grid = layer_ab.grid
        assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-12)
        np.testing.assert_allclose(grid, layer_ba.grid.T, atol=1e-10)  # phi_AB(i, j) = phi_BA(j, i)
        # Two random rank-4 subspaces of R^32 overlap on average r/d = 4/32 = 0.125: far from 1.
        assert layer_ab.phi(4, 4) < 0.5
