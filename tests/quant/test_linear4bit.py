"""Linear4bit: forward/backward against the dequantized weight, memory held by autograd, state_dict, devices."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lorakit.quant import Linear4bit, nf4_storage_bytes


def _gaussian_linear(in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)  # LLM-style init
    return linear


def _inputs(*shape, seed=1, requires_grad=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", [(64, 32), (100, 688), (37, 1000), (33, 7), (1, 1)])
def test_forward_and_input_gradient_equal_the_dequantized_layer(shape):
    in_features, out_features = shape
    layer = Linear4bit.from_linear(_gaussian_linear(in_features, out_features), compute_dtype=torch.float32)
    x = _inputs(2, 3, in_features, requires_grad=True)
    weight = layer.dequantize()
    assert weight.shape == (out_features, in_features) and weight.dtype == torch.float32
    y = layer(x)
    reference = F.linear(x, weight, layer.bias)
    torch.testing.assert_close(y, reference, rtol=0, atol=0)
    grad_out = _inputs(2, 3, out_features, seed=2)
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    (reference_grad,) = torch.autograd.grad(reference, x, grad_out)
    torch.testing.assert_close(grad_x, reference_grad, rtol=1e-6, atol=1e-6)


def test_output_close_to_the_fp32_layer_within_the_nf4_error():
    """For N(0, s^2) weights the NF4 weight error is 0.092 s RMS (test_nf4), so ~9% relative output error."""
    linear = _gaussian_linear(512, 256)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    x = _inputs(64, 512)
    with torch.no_grad():
        exact, approx = linear(x) - linear.bias, layer(x) - layer.bias
    relative = ((approx - exact).norm() / exact.norm()).item()
    assert 0.08 < relative < 0.105


@pytest.mark.parametrize("chunk_elements", [1, 700, 64 * 37 + 5])
def test_row_chunked_forward_and_backward_equal_the_one_piece_version(chunk_elements):
    layer = Linear4bit.from_linear(_gaussian_linear(37, 1000), compute_dtype=torch.float32)
    x = _inputs(4, 37, requires_grad=True)
    y_whole = layer(x)
    (g_whole,) = torch.autograd.grad(y_whole.square().sum(), x)
    layer.chunk_elements = chunk_elements
    y_chunked = layer(x)
    (g_chunked,) = torch.autograd.grad(y_chunked.square().sum(), x)
    torch.testing.assert_close(y_chunked, y_whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_chunked, g_whole, rtol=1e-5, atol=1e-5)


def _saved_tensor_sizes(fn):
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sizes


def test_autograd_keeps_no_full_size_weight_between_forward_and_backward():
    layer = Linear4bit.from_linear(_gaussian_linear(96, 160), compute_dtype=torch.float32)
    x = _inputs(2, 96, requires_grad=True)
    weights = 96 * 160
    saved = _saved_tensor_sizes(lambda: layer(x))
    assert (
        saved and max(saved) <= weights // 2
    )  # the packed codes (n/2 bytes) are the biggest thing referenced
    # the same check catches the naive version, which saves the decoded weight for backward
    naive = _saved_tensor_sizes(lambda: F.linear(x, layer.dequantize().requires_grad_()))
    assert max(naive) >= weights
    assert not [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]  # no cached decode either


def test_bf16_compute_returns_the_input_dtype_and_matches_fp32_compute():
    linear = _gaussian_linear(128, 64)
    layer_fp32 = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    layer_bf16 = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = _inputs(8, 128)
    with torch.no_grad():
        y32, y16 = layer_fp32(x), layer_bf16(x)
        y16_in = layer_bf16(x.to(torch.bfloat16))
    assert y16.dtype == torch.float32 and y16_in.dtype == torch.bfloat16
    torch.testing.assert_close(y16, y32, rtol=0.02, atol=0.02)  # bf16 has 8 mantissa bits
    assert layer_bf16.dequantize().dtype == torch.bfloat16


def test_weight_descriptor_shape_dtype_device():
    layer = Linear4bit.from_linear(_gaussian_linear(40, 24), compute_dtype=torch.bfloat16)
    assert layer.weight.shape == (24, 40) and layer.weight.size(0) == 24 and layer.weight.numel() == 960
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.device == torch.device("cpu")
    assert layer.weight.requires_grad is False and layer.weight.ndim == 2
    assert torch.equal(layer.weight.dequantize(), layer.dequantize())
    assert not list(layer.parameters(recurse=False))[0].requires_grad  # the bias is frozen


def test_storage_bytes_are_the_buffers_only():
    layer = Linear4bit.from_linear(_gaussian_linear(100, 688), compute_dtype=torch.float32)
    assert layer.storage_bytes() == nf4_storage_bytes(68800)
    assert {name for name, _ in layer.named_buffers()} == {
        "weight_nf4",
        "absmax_codes",
        "absmax_scales",
        "absmax_offset",
        "nf4_code",
    }


def test_state_dict_round_trips_through_safetensors(tmp_path):
    source = Linear4bit.from_linear(_gaussian_linear(100, 688), compute_dtype=torch.float32)
    path = tmp_path / "layer.safetensors"
    save_file(source.state_dict(), str(path))
    target = Linear4bit(100, 688, compute_dtype=torch.float32)
    x = _inputs(3, 100)
    with torch.no_grad():
        assert not torch.equal(target(x), source(x))
        target.load_state_dict(load_file(str(path)))
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_load_state_dict_rejects_a_different_shape():
    source = Linear4bit.from_linear(_gaussian_linear(64, 64))
    with pytest.raises(RuntimeError, match="size mismatch"):
        Linear4bit(64, 128).load_state_dict(source.state_dict())


def test_to_dtype_changes_compute_dtype_but_not_the_quantized_state():
    layer = Linear4bit.from_linear(_gaussian_linear(64, 64), compute_dtype=torch.float32)
    before = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    for name, buffer in layer.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    layer.float()
    assert layer.compute_dtype == torch.float32
    layer.to("cpu")
    assert layer.compute_dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_moves_all_state_and_matches_cpu():
    layer = Linear4bit.from_linear(_gaussian_linear(100, 688), compute_dtype=torch.float32)
    x = _inputs(3, 100)
    with torch.no_grad():
        expected = layer(x)
        layer.to("cuda")
        assert all(buffer.device.type == "cuda" for buffer in layer.buffers())
        torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=1e-5, atol=1e-5)


def test_to_linear_and_bad_input():
    layer = Linear4bit.from_linear(_gaussian_linear(48, 16), compute_dtype=torch.float32)
    linear = layer.to_linear()
    x = _inputs(5, 48)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), layer(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="last dimension 48"):
        layer(_inputs(5, 47))
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit.from_linear(nn.Linear(4, 4), compute_dtype=torch.int8)
    with pytest.raises(TypeError, match="nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))
