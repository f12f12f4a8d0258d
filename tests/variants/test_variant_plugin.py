"""A new LoRA variant is one module plus one row of ``lorakit.variants.VARIANTS``: this test adds one.

The "gate" variant scales each output feature of the update by a trainable gate ``g`` (ones at start):
``h = W0 x + g * (s B A x)``, merged as ``W0 + diag(g) s B A``. Nothing else in lorakit is changed: the row is
added with monkeypatch, the flag lives in a config subclass, and forward, merge, unmerge, gradients, saving
and strict loading must all work through the plug-in contract alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit
from lorakit import variants
from lorakit.config import LoraConfig
from lorakit.variants.base import LoraVariant, VariantSpec
from tests.train.helpers import tiny_llama


class GateVector(nn.Module):
    def __init__(self, size: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))


class GateVariant(LoraVariant):
    name, label, containers = "gate", "gate", ("lora_gate",)

    def init(self, layer, name):
        layer.lora_gate[name] = GateVector(layer.out_features, layer._adapter_dtype_device()[0])

    def forward(self, layer, name, x, result):
        update = layer.lora_update(name, x, torch.zeros_like(result))
        return result + layer.lora_gate[name].weight * update

    def _gated_delta(self, layer, name):
        rows = layer._to_rows(layer.delta_weight(name))
        return rows * layer.lora_gate[name].weight.detach()[:, None]

    def merged_weight(self, layer, name, weight):
        return weight + layer._from_rows(self._gated_delta(layer, name), weight).to(weight.dtype)

    def unmerged_weight(self, layer, name, weight):
        return weight - layer._from_rows(self._gated_delta(layer, name), weight).to(weight.dtype)

    def state_keys(self, layer, name):
        return {"lora_gate": f"lora_gate.{name}.weight"}


@dataclass
class GateConfig(LoraConfig):
    use_gate: bool = False


@pytest.fixture
def gate_row(monkeypatch):
    spec = VariantSpec(
        name="gate", config_flag="use_gate", factory=lambda layer: GateVariant(), containers=("lora_gate",)
    )
    monkeypatch.setattr(variants, "VARIANTS", (*variants.VARIANTS, spec))


def _gated_model():
    torch.manual_seed(0)
    config = GateConfig(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False, use_gate=True
    )
    model = lorakit.get_peft_model(tiny_llama(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_gate" in name:
                param.copy_(torch.linspace(-1.0, 2.0, param.numel()))
    return model, config


def test_forward_is_the_gated_formula(gate_row):
    model, _ = _gated_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.adapter_layer_names[-1] == "lora_gate" and isinstance(
        layer.lora_variant["default"], GateVariant
    )
    x = torch.randn(3, layer.in_features)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = layer.lora_gate["default"].weight
    expected = layer.base_layer(x) + g * (2.0 * x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    layer(x).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0  # the gate trains


def test_merge_unmerge_and_unload(gate_row):
    model, _ = _gated_model()
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    with torch.no_grad():
        unmerged = model(ids).logits
        weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
        model.unmerge_adapter()
        torch.testing.assert_close(
            model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight,
            weight,
            atol=1e-6,
            rtol=0,
        )
        plain = model.merge_and_unload()
        torch.testing.assert_close(plain(ids).logits, unmerged, atol=1e-5, rtol=0)


def test_gate_is_saved_and_loaded_strictly(gate_row, tmp_path):
    model, _ = _gated_model()
    model.save_pretrained(tmp_path)
    saved = lorakit.load_peft_weights(tmp_path)
    gates = [k for k in saved if k.endswith(".lora_gate")]
    assert len(gates) == 4  # q_proj and v_proj of two layers, under the variant's own file key
    loaded = lorakit.PeftModel.from_pretrained(
        tiny_llama(), tmp_path, config=GateConfig.from_pretrained(tmp_path)
    )
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)
    without_gate = LoraConfig.from_pretrained(tmp_path)  # a library without the row: the file does not fit
    with pytest.raises(ValueError, match="lora_gate"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=without_gate)


def test_set_adapter_and_delete_cover_the_variant_container(gate_row):
    model, config = _gated_model()
    model.add_adapter("other", GateConfig(**{**config.__dict__, "use_gate": True}))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert (
        layer.lora_gate["default"].weight.requires_grad and not layer.lora_gate["other"].weight.requires_grad
    )
    model.set_adapter("other")
    assert (
        not layer.lora_gate["default"].weight.requires_grad and layer.lora_gate["other"].weight.requires_grad
    )
    model.delete_adapter("default")
    assert list(layer.lora_gate) == ["other"] and "default" not in layer.lora_variant
