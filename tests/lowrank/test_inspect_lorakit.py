"""inspect reads adapters saved by lorakit's own save_pretrained (file format of CONTRACTS.md)."""

from __future__ import annotations

import numpy as np
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.lowrank import inspect_adapter, read_adapter

from .adapter_builders import tiny_llama


def test_lorakit_saved_adapter(tmp_path):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        init_lora_weights=False,
    )
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), config)
    model.save_pretrained(str(tmp_path))
    parameters = dict(model.named_parameters())
    layers = {layer.name: layer for layer in read_adapter(tmp_path).layers}
    assert len(layers) == 4
    for name, layer in layers.items():
        A = parameters[f"base_model.model.{name}.lora_A.default.weight"].detach().double().numpy()
        B = parameters[f"base_model.model.{name}.lora_B.default.weight"].detach().double().numpy()
        rank = 2 if name.endswith("v_proj") else 4
        assert layer.rank == rank
        np.testing.assert_allclose(layer.delta(), 8 / rank * B @ A, rtol=1e-5, atol=1e-7)
    report = inspect_adapter(tmp_path)
    assert [layer.stats.numerical_rank for layer in report.layers] == [4, 2, 4, 2]
