"""LoRA on nn.MultiheadAttention (in_proj_weight and out_proj): formula, PEFT's file format, merging, gradients.

PEFT 0.21.2 adds the out_proj update twice (W_out + 2 s B A; huggingface/peft pull request 3774); lorakit adds it
once. The side-by-side tests pin that relation exactly: lorakit with PEFT's out_proj ``lora_B`` doubled gives
PEFT's outputs, and with out_proj's ``lora_B`` at zero the two agree as they are.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.inject import lora_layers
from lorakit.layers import LoraLayer
from lorakit.mha_layer import MultiheadAttention, OutProjection

E = 8


class TinyAttentionNet(nn.Module):
    def __init__(self, batch_first: bool = True, **attention_kwargs):
        super().__init__()
        self.proj = nn.Linear(E, E)
        self.attn = nn.MultiheadAttention(E, 2, batch_first=batch_first, **attention_kwargs)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        h = torch.tanh(self.proj(x))
        attended, _ = self.attn(h, h, h)
        return self.head(attended)


def _base(seed: int = 0, **kwargs) -> TinyAttentionNet:
    torch.manual_seed(seed)
    return TinyAttentionNet(**kwargs).eval()


def _x(batch_first: bool = True) -> torch.Tensor:
    x = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(3))
    return x if batch_first else x.transpose(0, 1)


CONFIG = dict(target_modules=["attn"], r=2, lora_alpha=4)


def _peft_model(zero_out_proj_B: bool = False):
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    if zero_out_proj_B:
        with torch.no_grad():
            theirs.base_model.model.attn.base_layer.out_proj.lora_B["default"].weight.zero_()
    return theirs


def _ours_from(directory, **kwargs):
    return lorakit.PeftModel.from_pretrained(_base(), directory, **kwargs).eval()


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _reference(ours, out_proj_factor: float = 1.0, **kwargs) -> TinyAttentionNet:
    """The base model with ``W_in + s B A`` and ``W_out + factor * s B A`` written into a plain attention."""
    layer = ours.get_base_model().attn
    reference = _base(**kwargs)
    with torch.no_grad():
        reference.attn.in_proj_weight += layer.delta_weight("default")
        reference.attn.out_proj.weight += out_proj_factor * layer.out_proj.delta_weight("default")
    return reference


def _file_shapes(path):
    return {k: tuple(v.shape) for k, v in load_file(path / "adapter_model.safetensors").items()}


# ------------------------------------------------------------------------------------------------- formula
# without grad (in eval mode), nn.MultiheadAttention takes its fused fast path
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_forward_is_attention_with_adapted_in_and_out_projections(batch_first, grad):
    ours = lorakit.get_peft_model(
        _base(batch_first=batch_first), lorakit.LoraConfig(init_lora_weights=False, **CONFIG)
    ).eval()
    x = _x(batch_first)
    with torch.set_grad_enabled(grad):
        expected = _reference(ours, batch_first=batch_first)(x)
        assert (expected - _base(batch_first=batch_first)(x)).abs().max() > 1e-2
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


def test_transformer_encoder_layer_fast_path_sees_the_adapted_weights():
    """nn.TransformerEncoderLayer's inference fast path reads self_attn.in_proj_weight / out_proj.weight itself."""

    def encoder():
        torch.manual_seed(0)
        return nn.TransformerEncoderLayer(E, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()

    ours = lorakit.get_peft_model(
        encoder(),
        lorakit.LoraConfig(init_lora_weights=False, target_modules=["self_attn"], r=2, lora_alpha=4),
    ).eval()
    layer = ours.get_base_model().self_attn
    reference = encoder()
    with torch.no_grad():
        reference.self_attn.in_proj_weight += layer.delta_weight("default")
        reference.self_attn.out_proj.weight += layer.out_proj.delta_weight("default")
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)  # slow path (grad enabled)


# -------------------------------------------------------------------------------------------- side by side
def test_saved_keys_equal_peft_and_files_load_both_ways(tmp_path):
    theirs = _peft_model()
    theirs.save_pretrained(tmp_path / "peft")
    ours = _ours_from(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert expected == {
        "base_model.model.attn.lora_A.weight": (2, E),
        "base_model.model.attn.lora_B.weight": (3 * E, 2),
        "base_model.model.attn.base_layer.out_proj.lora_A.weight": (2, E),
        "base_model.model.attn.base_layer.out_proj.lora_B.weight": (E, 2),
    }
    assert _file_shapes(tmp_path / "ours") == expected
    # both ways, tensor for tensor
    for key, tensor in load_file(tmp_path / "peft" / "adapter_model.safetensors").items():
        torch.testing.assert_close(load_file(tmp_path / "ours" / "adapter_model.safetensors")[key], tensor)
    reloaded = peft.PeftModel.from_pretrained(_base(), tmp_path / "ours").eval()
    for key, tensor in peft.get_peft_model_state_dict(reloaded).items():
        torch.testing.assert_close(tensor, peft.get_peft_model_state_dict(theirs)[key], atol=0, rtol=0)
    torch.testing.assert_close(_out(reloaded, _x()), _out(theirs, _x()), atol=0, rtol=0)


def test_in_proj_update_equals_peft_unmerged_and_merged(tmp_path):
    theirs = _peft_model(zero_out_proj_B=True)  # PEFT's doubled out_proj update is then zero either way
    theirs.save_pretrained(tmp_path)
    ours, x = _ours_from(tmp_path), _x()
    torch.testing.assert_close(_out(ours, x), _out(theirs, x), atol=1e-5, rtol=0)
    assert (_out(ours, x) - _out(_base(), x)).abs().max() > 1e-2
    torch.testing.assert_close(
        _out(ours.merge_and_unload(), x), _out(theirs.merge_and_unload(), x), atol=1e-5, rtol=0
    )


def test_out_proj_update_counts_once_where_peft_0_21_counts_it_twice(tmp_path):
    theirs = _peft_model()
    theirs.save_pretrained(tmp_path)
    ours, x = _ours_from(tmp_path), _x()
    torch.testing.assert_close(_out(ours, x), _out(_reference(ours), x), atol=1e-5, rtol=0)
    # If this fails, PEFT fixed its double merge: compare with PEFT directly and drop the doubling below.
    torch.testing.assert_close(
        _out(theirs, x), _out(_reference(ours, out_proj_factor=2.0), x), atol=1e-5, rtol=0
    )
    with torch.no_grad():
        ours.get_base_model().attn.out_proj.lora_B["default"].weight.mul_(2)
    torch.testing.assert_close(_out(ours, x), _out(theirs, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        _out(ours.merge_and_unload(), x), _out(theirs.merge_and_unload(), x), atol=1e-5, rtol=0
    )


def test_trainable_parameters_match_peft():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(**CONFIG))
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(**CONFIG))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


# ------------------------------------------------------------------------------------------------- merging
def test_merge_and_unload_returns_plain_attention_with_the_same_outputs():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    x = _x()
    unmerged = _out(ours, x)
    merged = ours.merge_and_unload()
    assert type(merged.attn) is nn.MultiheadAttention
    assert type(merged.attn.out_proj) is type(_base().attn.out_proj)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(_base().state_dict())
    torch.testing.assert_close(_out(merged, x), unmerged, atol=1e-5, rtol=0)


def test_merge_adapter_then_unmerge_restores_base_weights():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    attention = ours.get_base_model().attn.base_layer
    in_before = attention.in_proj_weight.detach().clone()
    out_before = attention.out_proj.base_layer.weight.detach().clone()
    x = _x()
    unmerged = _out(ours, x)
    ours.merge_adapter()
    assert not torch.allclose(attention.in_proj_weight, in_before)
    assert not torch.allclose(attention.out_proj.base_layer.weight, out_before)
    torch.testing.assert_close(_out(ours, x), unmerged, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(attention.in_proj_weight, in_before, atol=1e-6, rtol=0)
    torch.testing.assert_close(attention.out_proj.base_layer.weight, out_before, atol=1e-6, rtol=0)
    assert isinstance(attention.in_proj_weight, nn.Parameter) and not attention.in_proj_weight.requires_grad
    torch.testing.assert_close(_out(ours, x), unmerged, atol=1e-6, rtol=0)


def test_layer_loops_reach_out_proj_before_its_owner_and_merge_once_without_warnings():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    assert [name for name, _ in lora_layers(ours.get_base_model())] == ["attn.base_layer.out_proj", "attn"]
    x = _x()
    unmerged = _out(ours, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.merge_adapter()
        torch.testing.assert_close(_out(ours, x), unmerged, atol=1e-5, rtol=0)  # out_proj merged once
        ours.unmerge_adapter()
    layer = ours.get_base_model().attn
    layer.merge()  # directly on the attention layer: out_proj is merged with it
    assert layer.out_proj.merged_adapters == ["default"]
    torch.testing.assert_close(_out(ours, x), unmerged, atol=1e-5, rtol=0)


def test_disable_adapter_gives_the_base_model_even_when_merged():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    x = _x()
    with ours.disable_adapter():
        torch.testing.assert_close(_out(ours, x), _out(_base(), x), atol=1e-6, rtol=0)
    ours.merge_adapter()
    with ours.disable_adapter():
        torch.testing.assert_close(_out(ours, x), _out(_base(), x), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------- training, adapters
def test_only_adapter_parameters_get_gradients():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(init_lora_weights=False, **CONFIG)).train()
    ours(_x()).pow(2).mean().backward()
    adapter_names = set()
    for name, param in ours.named_parameters():
        is_adapter = ".lora_" in name
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            adapter_names.add(name)
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert len(adapter_names) == 4  # in_proj A, B and out_proj A, B


def test_second_adapter_switches_and_deletes_on_in_proj_and_out_proj():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(init_lora_weights=False, **CONFIG)).eval()
    ours.add_adapter("other", lorakit.LoraConfig(init_lora_weights=False, **CONFIG))
    layer = ours.get_base_model().attn
    assert layer.out_proj.adapter_names == ["default", "other"]
    x = _x()
    first = _out(ours, x)
    ours.set_adapter("other")
    assert layer.out_proj.active_adapters == ["other"]
    assert layer.out_proj.lora_A["other"].weight.requires_grad
    assert not layer.out_proj.lora_A["default"].weight.requires_grad
    reference = _base()
    with torch.no_grad():
        reference.attn.in_proj_weight += layer.delta_weight("other")
        reference.attn.out_proj.weight += layer.out_proj.delta_weight("other")
    torch.testing.assert_close(_out(ours, x), _out(reference, x), atol=1e-5, rtol=0)
    ours.set_adapter("default")
    ours.delete_adapter("other")
    assert layer.out_proj.adapter_names == ["default"] and "other" not in layer.lora_A
    torch.testing.assert_close(_out(ours, x), first, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------- errors
def test_dora_is_refused():
    with pytest.raises(ValueError, match="does not support DoRA"):
        lorakit.get_peft_model(_base(), lorakit.LoraConfig(use_dora=True, **CONFIG))


def test_separate_key_value_sizes_are_refused():
    with pytest.raises(ValueError, match="same size"):
        lorakit.get_peft_model(_base(kdim=4, vdim=4), lorakit.LoraConfig(**CONFIG))


def test_targeting_out_proj_alone_is_an_error_and_all_linear_skips_it():
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention.*'attn'"):
        lorakit.get_peft_model(_base(), lorakit.LoraConfig(target_modules=["out_proj"]))
    both = lorakit.get_peft_model(_base(), lorakit.LoraConfig(target_modules=["attn", "out_proj"]))
    assert isinstance(both.get_base_model().attn, MultiheadAttention)
    every_linear = lorakit.get_peft_model(_base(), lorakit.LoraConfig(target_modules="all-linear"))
    model = every_linear.get_base_model()
    assert isinstance(model.proj, LoraLayer) and type(model.attn) is nn.MultiheadAttention
    every_linear(_x())  # runs: out_proj was left alone


def test_mixed_adapter_batches_are_refused():
    ours = lorakit.get_peft_model(_base(), lorakit.LoraConfig(**CONFIG)).eval()
    with pytest.raises(ValueError, match="Linear and Embedding layers only"):
        ours(_x(), adapter_names=["default", "__base__"])


def test_wrapper_reads_like_the_attention_it_wraps():
    attention = nn.MultiheadAttention(E, 2, batch_first=True)
    layer = MultiheadAttention(copy.deepcopy(attention))
    for attribute in ("embed_dim", "num_heads", "head_dim", "batch_first", "dropout", "_qkv_same_embed_dim"):
        assert getattr(layer, attribute) == getattr(attention, attribute), attribute
    assert isinstance(layer.out_proj, OutProjection)
    torch.testing.assert_close(layer.in_proj_weight, attention.in_proj_weight)  # no adapter yet
