"""lorakit.initializers against PEFT 0.21.2 (PiSSA, pissa_niter_K, OLoRA) and against LoftQ's algorithm.

PEFT's loftq_init moves the weight to CUDA, so the LoftQ reference is PEFT's loop transcribed here with its own
``_low_rank_decomposition`` and bitsandbytes' CPU NF4 functions (``compress_statistics=False``, PEFT's setting).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from lorakit.initializers import loftq, olora, parse_init, pissa, quantization_error
from lorakit.quant import Linear4bit, quantize_nf4

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 16)
        self.conv = Conv1D(20, 16)  # GPT-2 layout: weight (in=16, out=20)
        nn.init.normal_(self.conv.weight, std=0.2)

    def forward(self, x):
        return self.conv(torch.tanh(self.lin(x)))


def _peft_model(init, use_rslora=False, targets=("lin", "conv")):
    torch.manual_seed(0)
    model = Tiny().eval()
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(5, 24)
    expected = model(x)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=init, use_rslora=use_rslora
    )
    peft_model = peft.get_peft_model(model, config)
    return peft_model, original, x, expected


def _layer(peft_model, name):
    layer = peft_model.get_submodule(f"base_model.model.{name}")
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]


def _oi(name, weight):
    """The base weight in (out, in) layout."""
    return weight.T if name == "conv" else weight


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("name", ["lin", "conv"])
def test_pissa_equals_peft(name, use_rslora):
    peft_model, original, x, expected = _peft_model("pissa", use_rslora)
    layer, peft_A, peft_B, scaling = _layer(peft_model, name)
    assert scaling == (2.0 if use_rslora is False else 4.0)
    W = _oi(name, original[f"{name}.weight"])
    A, B, residual = pissa(W, 4, scaling)
    assert A.shape == (4, W.shape[1]) and B.shape == (W.shape[0], 4) and residual.dtype == torch.float32
    torch.testing.assert_close(A, peft_A, atol=TOL, rtol=0)
    torch.testing.assert_close(B, peft_B, atol=TOL, rtol=0)
    torch.testing.assert_close(residual, _oi(name, layer.base_layer.weight), atol=TOL, rtol=0)
    torch.testing.assert_close(residual + scaling * B @ A, W, atol=TOL, rtol=0)
    # PiSSA's residual is the SVD tail: its top singular value is W's (r+1)-th.
    S = torch.linalg.svdvals(W)
    torch.testing.assert_close(torch.linalg.svdvals(residual)[0], S[4], atol=TOL, rtol=0)
    torch.testing.assert_close(scaling * torch.linalg.svdvals(B @ A)[:4], S[:4], atol=TOL, rtol=1e-6)
    torch.testing.assert_close(peft_model(x), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("niter", [1, 4])
def test_pissa_niter_equals_peft_with_the_same_random_state(monkeypatch, niter):
    import peft.tuners.lora.layer as peft_layer

    calls = []
    real = peft_layer.svd_lowrank
    assert real is torch.svd_lowrank  # PEFT imports torch's own randomized SVD

    def recording(matrix, q, niter):
        calls.append((matrix.detach().clone(), q, niter, torch.get_rng_state()))
        return real(matrix, q, niter=niter)

    monkeypatch.setattr(peft_layer, "svd_lowrank", recording)
    peft_model, original, x, expected = _peft_model(f"pissa_niter_{niter}")
    assert [c[1:3] for c in calls] == [(4, niter), (4, niter)]
    for (matrix, _, _, rng), name in zip(calls, ["lin", "conv"], strict=True):
        layer, peft_A, peft_B, scaling = _layer(peft_model, name)
        W = _oi(name, original[f"{name}.weight"])
        torch.testing.assert_close(matrix, W, atol=0, rtol=0)
        torch.set_rng_state(rng)
        A, B, residual = pissa(W, 4, scaling, niter=niter)
        torch.testing.assert_close(A, peft_A, atol=TOL, rtol=0)
        torch.testing.assert_close(B, peft_B, atol=TOL, rtol=0)
        torch.testing.assert_close(residual, _oi(name, layer.base_layer.weight), atol=TOL, rtol=0)
        torch.testing.assert_close(residual + scaling * B @ A, W, atol=TOL, rtol=0)
    torch.testing.assert_close(peft_model(x), expected, atol=TOL, rtol=0)


def test_pissa_niter_uses_the_global_generator():
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    first = pissa(W, 4, 2.0, niter=2)
    torch.manual_seed(3)
    again = pissa(W, 4, 2.0, niter=2)
    other = pissa(W, 4, 2.0, niter=2)  # generator advanced: a different random sketch
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[2], other[2])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_olora_equals_peft(use_rslora):
    peft_model, original, x, expected = _peft_model("olora", use_rslora, targets=("lin",))
    layer, peft_A, peft_B, scaling = _layer(peft_model, "lin")
    W = original["lin.weight"]
    A, B, residual = olora(W, 4, scaling)
    torch.testing.assert_close(A, peft_A, atol=TOL, rtol=0)
    torch.testing.assert_close(B, peft_B, atol=TOL, rtol=0)
    torch.testing.assert_close(residual, layer.base_layer.weight, atol=TOL, rtol=0)
    torch.testing.assert_close(residual + scaling * B @ A, W, atol=TOL, rtol=0)
    torch.testing.assert_close(B.T @ B, torch.eye(4), atol=TOL, rtol=0)  # orthonormal columns
    assert torch.all(A.tril(-1) == 0)  # R is upper triangular
    torch.testing.assert_close(peft_model(x), expected, atol=TOL, rtol=0)


def test_olora_on_a_transposed_conv1d_weight_keeps_the_function():
    torch.manual_seed(0)
    conv = Conv1D(20, 16)
    nn.init.normal_(conv.weight, std=0.2)
    x = torch.randn(5, 16)
    A, B, residual = olora(conv.weight.T, 4, 2.0)
    y = x @ residual.T + 2.0 * (x @ A.T) @ B.T + conv.bias
    torch.testing.assert_close(y, conv(x), atol=TOL, rtol=0)


def test_inputs_are_not_modified_and_other_dtypes_are_upcast():
    W = torch.randn(12, 10, generator=torch.Generator().manual_seed(2))
    copy = W.clone()
    for fn in (pissa, olora):
        A, B, residual = fn(W.to(torch.bfloat16), 3, 1.5)
        assert {A.dtype, B.dtype, residual.dtype} == {torch.float32}
        fn(W, 3, 1.5)
    assert torch.equal(W, copy)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=0),
        dict(r=11),
        dict(r=2.0),
        dict(scaling=0.0),
        dict(scaling=float("nan")),
        dict(weight=torch.ones(4)),
    ],
)
def test_bad_arguments_are_refused(kwargs):
    args = dict(weight=torch.randn(12, 10), r=2, scaling=1.0) | kwargs
    for fn in (pissa, olora, loftq):
        with pytest.raises(ValueError):
            fn(**args)


@pytest.mark.parametrize(
    "value, expected",
    [
        (True, ("default", None)),
        (False, ("random", None)),
        ("gaussian", ("gaussian", None)),
        ("pissa", ("pissa", None)),
        ("pissa_niter_4", ("pissa", 4)),
        ("pissa_niter_16", ("pissa", 16)),
        ("olora", ("olora", None)),
        ("loftq", ("loftq", None)),
    ],
)
def test_parse_init_accepts(value, expected):
    assert parse_init(value) == expected


@pytest.mark.parametrize(
    "value",
    ["pissa_niter_x", "pissa_niter_", "pissa_niter_0", "pissa_niter_-2", "pissa_niter_+2", "pissa_niter_2.5",
     "pissa_niter_²", "corda", "eva", "True", "Pissa", "OLoRA", " loftq", "", 1, 0, None, 2.0],
)  # fmt: skip
def test_parse_init_refuses(value):
    with pytest.raises(
        ValueError, match=r"True, False, 'gaussian', 'pissa', 'pissa_niter_K'.*'olora' or 'loftq'"
    ):
        parse_init(value)


# ---------------------------------------------------------------- LoftQ


def _structured_weight(out=128, inp=192, seed=0):
    """A few large singular directions (outliers NF4 handles badly) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out, 6, generator=g))
    V, _ = torch.linalg.qr(torch.randn(inp, 6, generator=g))
    S = torch.tensor([30.0, 25.0, 20.0, 15.0, 10.0, 8.0])
    return U @ torch.diag(S) @ V.T + 0.02 * torch.randn(out, inp, generator=g)


class _BnbNF4:
    """bitsandbytes' CPU NF4 as PEFT's loftq_init uses it (blocks of 64, no double quantization)."""

    def __init__(self, weight):
        F = pytest.importorskip("bitsandbytes.functional")
        self.packed, self.state = F.quantize_4bit(
            weight, blocksize=64, compress_statistics=False, quant_type="nf4"
        )
        self._F = F

    def dequantize(self):
        return self._F.dequantize_4bit(self.packed, self.state)


def _peft_loftq_reference(weight, r, num_iter, quantize):
    """PEFT 0.21.2 loftq_init's loop (utils/loftq_utils.py), on the CPU."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    res = weight.clone()
    for i in range(num_iter):
        dequantized = quantize(res).dequantize()
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=r)
        L, R = out["L"], out["R"]
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(L, R)
    return dequantized, R, L


@pytest.mark.parametrize("num_iter", [1, 3])
@pytest.mark.parametrize("quantizer", ["bitsandbytes", "lorakit"])
def test_loftq_equals_peft_loop_with_scaling_one(quantizer, num_iter):
    W = _structured_weight()
    quantize = _BnbNF4 if quantizer == "bitsandbytes" else quantize_nf4
    deq, ref_A, ref_B = _peft_loftq_reference(W, 8, num_iter, quantize)
    A, B, Q = loftq(W, 8, 1.0, num_iter=num_iter, quantize=quantize)
    assert torch.equal(Q.dequantize(), deq)
    torch.testing.assert_close(A, ref_A, atol=1e-6, rtol=0)
    torch.testing.assert_close(B, ref_B, atol=1e-6, rtol=0)


def test_loftq_beats_plain_nf4_and_does_not_get_worse_with_iterations():
    W = _structured_weight()
    plain = quantization_error(W, quantize_nf4(W))
    errors = {}
    for num_iter in (1, 2, 5):
        A, B, Q = loftq(W, 8, 1.0, num_iter=num_iter)
        errors[num_iter] = quantization_error(W, Q, A, B)
    ratios = {k: v / plain for k, v in errors.items()}
    print(f"LoftQ error / plain NF4 error (r=8, 128x192): {ratios}")
    # measured: {1: 0.85, 2: 0.81, 5: 0.77}; rank 8 captures only part of NF4's (nearly full-rank) error
    assert ratios[1] < 0.9 and ratios[5] < 0.8
    assert errors[2] <= errors[1] * (1 + 1e-4) and errors[5] <= errors[2] * (1 + 1e-4)
    assert ratios[5] < ratios[1] - 0.03


@pytest.mark.parametrize("scaling", [0.5, 2.0, 16 / math.sqrt(8)])
def test_loftq_holds_for_any_scaling(scaling):
    W = _structured_weight(seed=1)
    A1, B1, Q1 = loftq(W, 8, 1.0, num_iter=2)
    A, B, Q = loftq(W, 8, scaling, num_iter=2)
    assert torch.equal(Q.dequantize(), Q1.dequantize())
    with_scaling = quantization_error(W, Q, A, B, scaling)
    assert with_scaling == pytest.approx(quantization_error(W, Q1, A1, B1), rel=1e-4)
    assert with_scaling < 0.85 * quantization_error(W, quantize_nf4(W))  # measured 0.82
    # PEFT 0.21.2 ignores the scaling (A = R, B = L), which is off by (scaling - 1) * L R.
    assert quantization_error(W, Q1, A1, B1, scaling) > 1.05 * with_scaling


def test_loftq_result_loads_into_linear4bit():
    W = _structured_weight(out=64, inp=96, seed=2)
    bias = torch.randn(64)
    A, B, Q = loftq(W, 8, 2.0, num_iter=2)
    layer = Linear4bit(96, 64, bias=False, compute_dtype=torch.float32)
    layer.load_quantized(Q)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    expected = x @ W.T + bias
    loftq_out = layer(x) + 2.0 * (x @ A.T) @ B.T + bias
    plain_out = Linear4bit.from_weight(W, compute_dtype=torch.float32)(x) + bias
    assert (loftq_out - expected).norm() < 0.8 * (plain_out - expected).norm()  # measured 0.70


def test_loftq_refuses_other_bits_and_iterations():
    W = torch.randn(16, 64)
    with pytest.raises(ValueError, match="num_bits=4"):
        loftq(W, 2, 1.0, num_bits=8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_iter"):
            loftq(W, 2, 1.0, num_iter=bad)
    with pytest.raises(ValueError, match="both A and B"):
        quantization_error(W, quantize_nf4(W), A=torch.zeros(2, 64))
