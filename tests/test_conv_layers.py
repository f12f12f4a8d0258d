"""LoRA and DoRA on nn.Conv1d / Conv2d / Conv3d, grouped convs included: formulas, and side by side with PEFT."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.conv_layers import Conv1d, Conv2d, Conv3d, _ConvNd
from lorakit.layers import make_lora_layer
from lorakit.serialization import load_adapter_weights, load_into_model


class TinyConvNet(nn.Module):
    """Two convolutions with a ReLU between them; both are adapted."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.conv = first
        self.proj = second

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)))


def _conv1d_net():
    return TinyConvNet(nn.Conv1d(4, 6, 3, padding=1), nn.Conv1d(6, 5, 1)), torch.randn(2, 4, 9)


def _conv3d_net():
    # not a 1x1x1 second conv: PEFT 0.21.2 cannot merge those (its 1x1 shortcut checks kernel dims 2:4 only)
    net = TinyConvNet(nn.Conv3d(3, 4, (2, 3, 3), padding=1), nn.Conv3d(4, 2, (1, 2, 2)))
    return net, torch.randn(2, 3, 4, 5, 5)


def _grouped_conv2d_net():
    net = TinyConvNet(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.Conv2d(6, 6, 3, padding=1, groups=3))
    return net, torch.randn(2, 4, 6, 6)


def _conv2d_net():
    return TinyConvNet(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.Conv2d(5, 4, 1)), torch.randn(2, 3, 8, 8)


# name -> (builder, LoraConfig kwargs shared by PEFT and lorakit)
CASES = {
    "conv1d": (_conv1d_net, dict(r=4, lora_alpha=8)),
    "conv3d": (_conv3d_net, dict(r=2, lora_alpha=4)),
    "conv2d-grouped": (_grouped_conv2d_net, dict(r=6, lora_alpha=6)),
    "conv2d-dora": (_conv2d_net, dict(r=3, lora_alpha=6, use_dora=True)),
    "conv1d-dora": (_conv1d_net, dict(r=2, lora_alpha=2, use_dora=True)),
    "conv3d-dora": (_conv3d_net, dict(r=2, lora_alpha=4, use_dora=True)),
}
MERGEABLE = [c for c in CASES if "grouped" not in c]


def _build(case, seed=0):
    builder, kwargs = CASES[case]
    torch.manual_seed(seed)
    model, x = builder()
    return model.eval(), x, dict(target_modules=["conv", "proj"], **kwargs)


def _peft_model(case, seed=0):
    """PEFT's model with random (non-zero) adapters and, with DoRA, magnitudes moved away from their init."""
    model, x, kwargs = _build(case, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups > 1: "merging is not supported"
        theirs = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.linspace(0.5, 1.5, param.numel()).view(param.shape))
    return theirs.eval(), x


def _ours_from(case, directory, is_trainable=False):
    model, _, _ = _build(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lorakit.PeftModel.from_pretrained(model, directory, is_trainable=is_trainable).eval()


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _file_shapes(directory):
    return {k: tuple(v.shape) for k, v in load_file(directory / "adapter_model.safetensors").items()}


# ------------------------------------------------------------------------------------------- side by side
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_gives_peft_outputs_in_lorakit(case, tmp_path):
    theirs, x = _peft_model(case)
    theirs.save_pretrained(tmp_path)
    ours = _ours_from(case, tmp_path)
    torch.testing.assert_close(_out(ours, x), _out(theirs, x), atol=1e-5, rtol=0)
    base, _, _ = _build(case)
    assert (_out(ours, x) - _out(base, x)).abs().max() > 1e-2  # the loaded adapter changes the model


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_file_has_peft_keys_and_loads_in_peft(case, tmp_path):
    theirs, x = _peft_model(case)
    theirs.save_pretrained(tmp_path / "peft")
    ours = _ours_from(case, tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    expected = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    assert _file_shapes(tmp_path / "ours") == expected == _file_shapes(tmp_path / "peft")
    base, _, _ = _build(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    torch.testing.assert_close(_out(reloaded, x), _out(ours, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_and_unload_matches_unmerged_and_peft(case, tmp_path):
    theirs, x = _peft_model(case)
    theirs.save_pretrained(tmp_path)
    ours = _ours_from(case, tmp_path)
    unmerged = _out(ours, x)
    merged_ours, merged_theirs = ours.merge_and_unload(), theirs.merge_and_unload()
    assert type(merged_ours.conv) is type(_build(case)[0].conv)  # no LoRA module left
    torch.testing.assert_close(_out(merged_ours, x), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(_out(merged_ours, x), _out(merged_theirs, x), atol=1e-5, rtol=0)
    for (name, ours_p), (_, theirs_p) in zip(
        merged_ours.state_dict().items(), merged_theirs.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(ours_p, theirs_p, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_adapter_then_unmerge_restores_base_weights(case, tmp_path):
    theirs, x = _peft_model(case)
    theirs.save_pretrained(tmp_path)
    ours = _ours_from(case, tmp_path)
    base_before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    unmerged = _out(ours, x)
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, x), unmerged, atol=1e-5, rtol=0)
    ours.unmerge_adapter()
    for name, param in ours.named_parameters():
        if name in base_before:
            torch.testing.assert_close(param, base_before[name], atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(_out(ours, x), unmerged, atol=1e-6, rtol=0)


def test_grouped_conv_refuses_to_merge_like_peft(tmp_path):
    theirs, x = _peft_model("conv2d-grouped")
    theirs.save_pretrained(tmp_path)
    ours = _ours_from("conv2d-grouped", tmp_path)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        theirs.merge_and_unload()
    with pytest.raises(NotImplementedError, match="groups > 1"):
        ours.merge_and_unload()
    unloaded = ours.unload()  # dropping the adapter works
    torch.testing.assert_close(_out(unloaded, x), _out(_build("conv2d-grouped")[0], x), atol=0, rtol=0)


@pytest.mark.parametrize("case", ["conv2d-dora", "conv1d-dora"])
def test_dora_training_forward_with_dropout_matches_peft(case, tmp_path):
    """With dropout in training, DoRA recomputes the base output for the dropped input (PEFT's path)."""
    theirs, x = _peft_model(case)
    theirs.save_pretrained(tmp_path)
    model, _, kwargs = _build(case)
    config = lorakit.LoraConfig(init_lora_weights=False, lora_dropout=0.3, **kwargs)
    ours = lorakit.get_peft_model(model, config)
    load_into_model(ours, load_adapter_weights(tmp_path), "default")
    for layer in (theirs.base_model.model.conv, theirs.base_model.model.proj):
        layer.lora_dropout["default"] = nn.Dropout(0.3)
    theirs.train(), ours.train()
    torch.manual_seed(7)
    expected = theirs(x)
    torch.manual_seed(7)
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_only_adapter_parameters_get_gradients(case):
    model, x, kwargs = _build(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = lorakit.get_peft_model(model, lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    ours.train()
    ours(x).pow(2).mean().backward()
    for name, param in ours.named_parameters():
        is_adapter = ".lora_" in name
        assert param.requires_grad == is_adapter, name
        if is_adapter:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_trainable_parameters_match_peft():
    model, _, kwargs = _build("conv2d-dora")
    ours = lorakit.get_peft_model(copy.deepcopy(model), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }


# ------------------------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize(
    ("conv", "x", "layer_cls", "conv_fn"),
    [
        (nn.Conv1d(3, 4, 3, padding=1), torch.randn(2, 3, 7), Conv1d, F.conv1d),
        (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5), Conv2d, F.conv2d),
        (nn.Conv3d(3, 4, 3, padding=1), torch.randn(2, 3, 4, 4, 4), Conv3d, F.conv3d),
        (
            nn.Conv3d(3, 4, 1, padding=1),
            torch.randn(2, 3, 4, 4, 4),
            Conv3d,
            F.conv3d,
        ),  # PEFT can't merge this
    ],
)
def test_update_equals_conv_with_delta_weight(conv, x, layer_cls, conv_fn):
    torch.manual_seed(0)
    layer = make_lora_layer(conv, fan_in_fan_out=False)
    assert type(layer) is layer_cls and isinstance(layer, _ConvNd)
    layer.update_layer("default", 2, 4.0, 0.0, False)
    expected = conv_fn(x, conv.weight + layer.delta_weight("default"), conv.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    weight_A, weight_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert weight_B.shape[2:] == (1,) * (conv.weight.dim() - 2)  # B is 1x1(x1)
    assert weight_A.shape == (2, 3, *conv.weight.shape[2:])
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


def test_default_init_starts_at_the_base_output():
    torch.manual_seed(0)
    layer = Conv3d(nn.Conv3d(2, 3, 3))
    layer.update_layer("default", 2, 4.0, 0.0, True)
    x = torch.randn(1, 2, 4, 4, 4)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")],
)
def test_dilation_and_padding_mode_are_kept_so_merged_equals_unmerged(conv):
    """PEFT's lora_A ignores both (a dilated conv fails there; a reflect-padded one merges to another output)."""
    torch.manual_seed(0)
    layer = Conv2d(conv)
    layer.update_layer("default", 2, 4.0, 0.0, False)
    x = torch.randn(2, 3, 7, 7)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


def test_dora_magnitude_is_per_output_channel_over_all_other_dims():
    torch.manual_seed(0)
    layer = Conv2d(nn.Conv2d(3, 5, 3, padding=1))
    layer.update_layer("default", 2, 2.0, 0.0, False, use_dora=True)
    combined = layer.base_layer.weight + layer.delta_weight("default")
    magnitude = layer.lora_magnitude_vector["default"].weight
    assert magnitude.shape == (1, 5, 1, 1)  # PEFT's shape
    torch.testing.assert_close(magnitude.reshape(-1), combined.flatten(1).norm(dim=1), atol=1e-6, rtol=0)
    with torch.no_grad():
        magnitude.mul_(torch.linspace(0.5, 1.5, 5).view(1, 5, 1, 1))
    kernel = magnitude.view(5, 1, 1, 1) * combined / combined.flatten(1).norm(dim=1).view(5, 1, 1, 1)
    x = torch.randn(2, 3, 6, 6)
    expected = F.conv2d(x, kernel, layer.base_layer.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x[0]), expected[0], atol=1e-5, rtol=0)  # unbatched input


def test_grouped_conv_needs_rank_divisible_by_groups():
    with pytest.warns(UserWarning, match="merging is not supported"):
        layer = Conv2d(nn.Conv2d(4, 6, 3, groups=2))
    with pytest.raises(ValueError, match="divisible by groups"):
        layer.update_layer("default", 3, 6.0, 0.0, True)
    layer.update_layer("default", 4, 8.0, 0.0, True)
    assert layer.lora_A["default"].groups == 1 and layer.lora_B["default"].groups == 2


def test_grouped_conv_refuses_dora():
    with pytest.warns(UserWarning):
        layer = Conv1d(nn.Conv1d(4, 6, 3, groups=2))
    with pytest.raises(ValueError, match="DoRA is not supported.*groups=2"):
        layer.update_layer("default", 2, 2.0, 0.0, True, use_dora=True)


def test_conv2d_is_still_importable_from_layers():
    from lorakit.layers import Conv2d as FromLayers

    assert FromLayers is Conv2d


def test_mixed_adapter_batches_are_refused_on_convs():
    model, x, kwargs = _build("conv1d")
    ours = lorakit.get_peft_model(model, lorakit.LoraConfig(**kwargs)).eval()
    with pytest.raises(ValueError, match="Linear and Embedding layers only"):
        ours(x, adapter_names=["default", "__base__"])
