"""NF4 format: code tables, rounding, packing, double quantization, storage size and expected error."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lorakit.quant.nf4 import (
    NF4_QUANTILE_OFFSET,
    dequantize_absmax,
    dequantize_blockwise,
    dequantize_nf4_range,
    double_quantize_absmax,
    dynamic_code_table,
    nf4_code_table,
    nf4_storage_bytes,
    pack_nibbles,
    quantize_blockwise,
    quantize_nf4,
    unpack_nibbles,
)

# QLoRA paper, Appendix E ("NormalFloat 4-bit data type"): the exact values of NF4.
PAPER_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf4_table_matches_paper_values_exactly():
    assert nf4_code_table().tolist() == torch.tensor(PAPER_NF4, dtype=torch.float32).tolist()


def test_nf4_table_is_normal_quantiles():
    """Independent of torch: Phi^-1 at 8 / 7 evenly spaced probabilities per side, divided by Phi^-1(offset)."""
    normal = statistics.NormalDist()
    top = normal.inv_cdf(NF4_QUANTILE_OFFSET)
    positive = [
        normal.inv_cdf(NF4_QUANTILE_OFFSET - i * (NF4_QUANTILE_OFFSET - 0.5) / 8) / top for i in range(8)
    ]
    negative = [
        -normal.inv_cdf(NF4_QUANTILE_OFFSET - i * (NF4_QUANTILE_OFFSET - 0.5) / 7) / top for i in range(7)
    ]
    expected = sorted(positive + negative + [0.0])
    assert nf4_code_table().tolist() == pytest.approx(expected, abs=3e-7)
    table = nf4_code_table()
    assert (
        table[7] == 0 and (table[:7] < 0).all() and (table[8:] > 0).all()
    )  # asymmetric: 7 negative, 8 positive
    assert NF4_QUANTILE_OFFSET == pytest.approx(1 - (1 / 30 + 1 / 32) / 2, abs=1e-7)


def test_dynamic_table_structure():
    table = dynamic_code_table()
    assert table.numel() == 256 and table.unique().numel() == 256
    assert torch.all(table[1:] > table[:-1])
    assert table.max() == 1.0 and 0.0 in table.tolist() and table.min() == pytest.approx(-0.99296875)
    positive = table[table > 0]
    # decade 10^-k holds 2^(6-k) values (k = 0..6), plus 1.0
    for k in range(7):
        in_decade = ((positive >= 0.1 * 10.0**-k) & (positive < 10.0**-k)).sum().item()
        assert in_decade == 2 ** (6 - k), k


def _brute_force_indices(values, code, blocksize):
    blocks = values.double().view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / absmax
    return (scaled.unsqueeze(-1) - code.double()).abs().argmin(dim=-1).view(-1)


@pytest.mark.parametrize("table", ["nf4", "dynamic"])
def test_quantize_blockwise_picks_the_nearest_code(table):
    code = nf4_code_table() if table == "nf4" else dynamic_code_table()
    values = torch.randn(64 * 50, generator=torch.Generator().manual_seed(0))
    indices, absmax = quantize_blockwise(values, code, 64)
    assert torch.equal(absmax, values.view(-1, 64).abs().amax(dim=1))
    assert torch.equal(indices.long(), _brute_force_indices(values, code, 64))


def test_partial_last_block_uses_its_own_absmax():
    values = torch.tensor([0.5, -1.0, 2.0, 4.0, -8.0])  # blocks of 2: [0.5,-1], [2,4], [-8]
    indices, absmax = quantize_blockwise(values, nf4_code_table(), 2)
    assert absmax.tolist() == [1.0, 4.0, 8.0]
    back = dequantize_blockwise(indices, absmax, nf4_code_table(), 2)
    assert back[1].item() == -1.0 and back[3].item() == 4.0 and back[4].item() == -8.0  # +-absmax is exact


def test_zero_block_dequantizes_to_zero():
    values = torch.cat([torch.zeros(64), torch.randn(64)])
    tensor = quantize_nf4(values)
    assert torch.all(tensor.dequantize()[:64] == 0)


def test_nibble_order_high_first_and_zero_padding():
    packed = pack_nibbles(torch.tensor([1, 2, 3], dtype=torch.uint8))
    assert packed.tolist() == [0x12, 0x37]  # odd count: the last low nibble is 7, the code of 0.0
    assert unpack_nibbles(packed, 3).tolist() == [1, 2, 3]
    codes = torch.randint(0, 16, (1001,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 1001), codes)


def test_double_quantization_error_is_within_half_a_code_step():
    absmax = torch.rand(1000, generator=torch.Generator().manual_seed(2)) * 0.1 + 0.02
    codes, scales, offset = double_quantize_absmax(absmax, 256)
    assert (
        codes.dtype == torch.uint8 and scales.shape == (4,) and offset.item() == pytest.approx(absmax.mean())
    )
    back = dequantize_absmax(codes, scales, offset, 256)
    table = dynamic_code_table()
    widest_gap = (table[1:] - table[:-1]).max()
    per_block_scale = scales.repeat_interleave(256)[:1000]
    assert torch.all((back - absmax).abs() <= per_block_scale * widest_gap / 2 + 1e-7)
    assert (back - absmax).abs().max() > 0  # it really is 8-bit


@pytest.mark.parametrize("shape", [(64, 256), (688, 100), (1000, 37), (3, 5), (1, 1)])
def test_storage_bytes_formula(shape):
    tensor = quantize_nf4(torch.randn(shape))
    n = math.prod(shape)
    blocks = math.ceil(n / 64)
    assert (
        tensor.nbytes
        == nf4_storage_bytes(n)
        == math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 64
    )
    assert tensor.packed.dtype == tensor.absmax_codes.dtype == torch.uint8


def test_bits_per_weight_is_4_127_for_whole_double_blocks():
    n = 64 * 256 * 12
    payload_bits = 8 * (nf4_storage_bytes(n) - 68)  # minus the fixed offset + NF4 table
    assert payload_bits / n == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125


def _expected_nf4_mse(blocksize: int = 64) -> float:
    """E[(x - Q(x))^2] for x ~ N(0, 1) with absmax blocks, by numerical integration (float64).

    The block maximum M has density B (2 Phi(m) - 1)^(B-1) 2 phi(m); it is stored exactly (code +-1), the other
    B - 1 values are N(0, 1) truncated to (-M, M): h(m) = m^3 int (u - q(u))^2 phi(m u) du / (2 Phi(m) - 1).
    """
    code = nf4_code_table().double()
    u = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    err2 = (u - code[torch.bucketize(u, (code[:-1] + code[1:]) / 2)]) ** 2
    m = torch.linspace(1, 7, 601, dtype=torch.float64)  # P(M < 1) = 0.68^64 ~ 1e-11
    phi = lambda t: torch.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = 0.5 * (1 + torch.erf(m / math.sqrt(2)))
    h = m**3 * torch.trapezoid(err2 * phi(m[:, None] * u), u, dim=1) / (2 * cdf - 1)
    density = blocksize * (2 * cdf - 1) ** (blocksize - 1) * 2 * phi(m)
    return (blocksize - 1) / blocksize * torch.trapezoid(density * h, m).item()


def test_quantization_error_on_standard_normal_matches_nf4_expectation():
    expected = _expected_nf4_mse()
    assert expected == pytest.approx(0.00846, abs=1e-5)  # RMS error 0.092 of the weights' std
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(3))
    code = nf4_code_table()
    indices, absmax = quantize_blockwise(x, code, 64)
    mse = ((x - dequantize_blockwise(indices, absmax, code, 64)) ** 2).mean().item()
    assert mse == pytest.approx(expected, rel=0.01)  # sampling error of 2^20 values is ~0.15%
    mse_double = ((x - quantize_nf4(x).dequantize()) ** 2).mean().item()
    assert mse <= mse_double <= mse * 1.005  # double quantization costs < 0.5% extra MSE


def test_range_dequantization_equals_slices_of_the_whole():
    tensor = quantize_nf4(torch.randn(37, 29))  # 1073 values: odd count, partial last block
    whole = tensor.dequantize().view(-1)
    for start, end in [(0, 1073), (1, 2), (63, 65), (100, 1073), (1072, 1073), (5, 5), (64, 128)]:
        assert torch.equal(dequantize_nf4_range(tensor, start, end), whole[start:end])
    with pytest.raises(IndexError):
        dequantize_nf4_range(tensor, 0, 1074)


def test_bf16_input_quantizes_like_its_fp32_values():
    weight = torch.randn(40, 48).to(torch.bfloat16)
    a, b = quantize_nf4(weight), quantize_nf4(weight.float())
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax_codes, b.absmax_codes)
    assert a.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="even"):
        quantize_nf4(torch.randn(8), blocksize=63)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0))
    with pytest.raises(ValueError, match="meta"):
        quantize_nf4(torch.empty(4, 4, device="meta"))
