"""LoRA layers against their formulas: h = W0 x + s B A x, DoRA, merge/unmerge, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.layers import Conv2d, Embedding, Linear, make_lora_layer


def _linear_with_adapter(init=False, r=4, alpha=8.0, rslora=False, dora=False, dropout=0.0):
    torch.manual_seed(0)
    layer = Linear(nn.Linear(6, 5))
    layer.update_layer("default", r, alpha, dropout, init, use_rslora=rslora, use_dora=dora)
    return layer


def test_linear_forward_is_base_plus_scaled_low_rank_product():
    layer = _linear_with_adapter(r=4, alpha=8.0)
    x = torch.randn(3, 6)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ W0.T + b + (8.0 / 4) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = _linear_with_adapter(r=4, alpha=8.0, rslora=True)
    assert layer.scaling["default"] == pytest.approx(8.0 / math.sqrt(4))


def test_default_init_has_kaiming_A_zero_B_and_starts_at_base():
    layer = _linear_with_adapter(init=True)
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(
        6
    )  # kaiming_uniform(a=sqrt(5)) on fan_in=6 gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    A = layer.lora_A["default"].weight
    assert A.abs().max() <= bound and A.abs().max() > bound / 2


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(4000, 5))
    layer.update_layer("default", 4, 8, 0.0, "gaussian")
    assert layer.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_conv1d_fan_in_fan_out_matches_equivalent_linear():
    torch.manual_seed(0)
    conv = Conv1D(5, 6)  # nf=out=5, nx=in=6, weight stored (in, out)
    layer = make_lora_layer(conv, fan_in_fan_out=False)
    assert layer.fan_in_fan_out  # set automatically for Conv1D
    layer.update_layer("default", 3, 6.0, 0.0, False)
    x = torch.randn(2, 6)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ conv.weight + conv.bias + 2.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    assert layer.delta_weight("default").shape == conv.weight.shape


def test_embedding_update_is_scaled_BA_transposed():
    torch.manual_seed(0)
    layer = Embedding(nn.Embedding(10, 4))
    layer.update_layer("default", 2, 4.0, 0.0, False)
    ids = torch.tensor([[1, 7, 3]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    table = layer.base_layer.weight + 2.0 * (B @ A).T
    torch.testing.assert_close(layer(ids), table[ids], atol=1e-6, rtol=0)


def test_conv2d_update_equals_conv_with_delta_weight():
    torch.manual_seed(0)
    layer = Conv2d(nn.Conv2d(3, 4, 3, padding=1))
    layer.update_layer("default", 2, 2.0, 0.0, False)
    x = torch.randn(1, 3, 5, 5)
    base = layer.base_layer
    expected = F.conv2d(x, base.weight + layer.delta_weight("default"), base.bias, padding=1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_dora_forward_matches_weight_decomposition_formula():
    layer = _linear_with_adapter(dora=True)
    W0 = layer.base_layer.weight
    combined = W0 + layer.delta_weight("default")
    # m starts at ||W0 + sBA|| per output row (B is random here), so the layer starts at W0 + sBA
    m = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(m, combined.norm(dim=1), atol=1e-6, rtol=0)
    with torch.no_grad():
        m.mul_(torch.linspace(0.5, 1.5, 5))
    W_dora = m[:, None] * combined / combined.norm(dim=1, keepdim=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ W_dora.T + layer.base_layer.bias, atol=1e-5, rtol=0)


def test_dora_norm_is_detached_from_the_graph():
    layer = _linear_with_adapter(dora=True)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    grad_layer = A.grad.clone()
    A.grad = None
    combined = W0 + 2.0 * B @ A
    ((m / combined.norm(dim=1).detach()) * (x @ combined.T) + b).sum().backward()
    torch.testing.assert_close(grad_layer, A.grad, atol=1e-6, rtol=0)
    A.grad = None
    combined = W0 + 2.0 * B @ A
    ((m / combined.norm(dim=1)) * (x @ combined.T) + b).sum().backward()  # norm NOT detached
    assert not torch.allclose(grad_layer, A.grad, atol=1e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(dora):
    layer = _linear_with_adapter(dora=dora)
    x = torch.randn(3, 6)
    before = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(layer.base_layer.weight, before)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()  # second merge is refused with a warning, never doubled
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=0)


def test_safe_merge_refuses_non_finite_weights():
    layer = _linear_with_adapter()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_unsupported_layer_type_is_rejected_with_names_of_supported_ones():
    with pytest.raises(TypeError, match="nn.Linear.*Conv1D"):
        make_lora_layer(nn.LayerNorm(4), fan_in_fan_out=False)


def test_non_positive_rank_is_rejected():
    layer = Linear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="positive"):
        layer.update_layer("default", 0, 8, 0.0, True)


def test_adapters_stay_fp32_over_a_bf16_base():
    layer = Linear(nn.Linear(8, 8).to(torch.bfloat16))
    layer.update_layer("default", 2, 4, 0.0, False)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
