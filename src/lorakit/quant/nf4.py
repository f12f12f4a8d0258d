"""NF4 block-wise quantization with double quantization (Dettmers et al. 2023, "QLoRA", section 3).

A weight tensor with ``n`` elements is flattened row-major (as bitsandbytes does, so a block may span two rows
when ``in_features`` is not a multiple of the block size) and stored as:

* **codes** -- one 4-bit index per weight into the 16-value NF4 table (§3 "4-bit NormalFloat"), two per byte,
  the first weight of each pair in the *high* nibble (bitsandbytes' order); ``ceil(n / 2)`` bytes. When ``n`` is
  odd the last low nibble is padding and holds the index of 0.0 (7).
* **block constants** -- one absmax ``c2`` per block of ``B = 64`` consecutive weights (the last block may be
  shorter and uses its own absmax), so ``w ~= c2[b] * NF4[code]``. The ``ceil(n / B)`` fp32 constants are
  double-quantized (§3 "Double Quantization"): their mean is subtracted (one fp32 ``offset``) and the centred
  values are quantized to 8 bits with the signed dynamic data type (Dettmers 2016; 2022 §2) in blocks of
  ``B2 = 256``, each with an fp32 scale ``c1``:  ``c2[b] ~= c1[b // B2] * DYN[q2[b]] + offset``.

Bytes for ``n`` weights, with ``nb = ceil(n / B)``::

    bytes(n) = ceil(n / 2) + nb + 4 * ceil(nb / B2) + 4 (offset) + 64 (the NF4 table, kept with each tensor)

so for ``n`` a multiple of ``B * B2`` the payload is exactly ``4 + 8/64 + 32/(64*256) = 4.126953125`` bits per
weight (the paper's 4.127), plus a fixed 68 bytes per tensor. The 256-value dynamic table is a constant of the
format (:func:`dynamic_code_table`), not stored per tensor.

Rounding is to the nearest table value (ties to the lower one), after scaling by ``x * (1 / absmax)``, which is
bitsandbytes' arithmetic; the tests check that codes, constants and dequantized values agree bit for bit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "NF4_QUANTILE_OFFSET",
    "NF4Tensor",
    "check_blocksize",
    "dequantize_absmax",
    "dequantize_blockwise",
    "dequantize_nf4_range",
    "double_quantize_absmax",
    "dynamic_code_table",
    "nf4_code_table",
    "nf4_storage_bytes",
    "pack_nibbles",
    "quantize_blockwise",
    "quantize_nf4",
    "unpack_nibbles",
]

NF4_QUANTILE_OFFSET = 0.9677083
"""Outermost quantile: ``1 - (1/30 + 1/32) / 2 = 0.96770833...`` (QLoRA §3), to the 7 digits the reference uses."""

_ZERO_INDEX = 7  # position of 0.0 in the NF4 table; used for the padding nibble
_TINY = 1e-38  # guards the reciprocal of an all-zero block's absmax (its codes all become 0.0)
_QUANTIZE_CHUNK_BLOCKS = 1 << 16  # blocks quantized at a time: bounds the float temporaries to ~4M values


@functools.cache
def _nf4_table_cpu() -> torch.Tensor:
    # 8 positive and 7 negative quantiles of N(0, 1) at evenly spaced probabilities between 0.5 and the
    # offset (0.5 itself excluded), plus an exact zero: 16 values, asymmetric, normalized so the largest is 1.
    positive = torch.special.ndtri(torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(NF4_QUANTILE_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values.float()
    return values / values.max()


def nf4_code_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values in ascending order (fp32), from -1 to 1 with ``table[7] == 0`` (QLoRA §3, eq. 4)."""
    return _nf4_table_cpu().to(device or "cpu", copy=True)


@functools.cache
def _dynamic_table_cpu() -> torch.Tensor:
    # Signed dynamic type: after the sign bit, k zero bits pick the decade 10^-k (k = 0..6), an indicator bit
    # follows and the remaining 6 - k bits index 2^(6-k) linearly spaced bin centres in [0.1, 1]. Plus 0 and 1.
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        decade = 10.0 ** (exponent - 6)
        values += (decade * centres).tolist() + (-decade * centres).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code_table(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256 values of the signed 8-bit dynamic data type used for the double quantization, ascending."""
    return _dynamic_table_cpu().to(device or "cpu", copy=True)


def check_blocksize(blocksize: int, name: str = "blocksize") -> None:
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"{name} must be a positive even integer (64 is QLoRA's), got {blocksize!r}.")


def quantize_blockwise(
    values: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax block quantization of a flat tensor to the nearest entry of a sorted ``code`` table.

    Returns ``(indices uint8 (n,), absmax fp32 (ceil(n / blocksize),))`` with
    ``indices[i] = argmin_j |code[j] - values[i] / absmax[i // blocksize]|`` (ties to the lower ``j``).
    """
    values = values.reshape(-1).float()
    n = values.numel()
    num_blocks = -(-n // blocksize)
    blocks = F.pad(values, (0, num_blocks * blocksize - n)).view(num_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)).clamp_(-1, 1)
    code = code.to(values.device, torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    indices = torch.bucketize(scaled, midpoints, out_int32=True)
    return indices.view(-1)[:n].to(torch.uint8), absmax


def dequantize_blockwise(
    indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: ``code[indices[i]] * absmax[i // blocksize]`` in fp32."""
    n = indices.numel()
    values = code.to(indices.device, torch.float32)[indices.reshape(-1).long()]
    num_blocks = absmax.numel()
    values = F.pad(values, (0, num_blocks * blocksize - n)).view(num_blocks, blocksize)
    return (values * absmax.float().unsqueeze(1)).view(-1)[:n]


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, the first in the high nibble; an odd count is padded with the zero code."""
    indices = indices.reshape(-1).to(torch.uint8)
    if indices.numel() % 2:
        indices = F.pad(indices, (0, 1), value=_ZERO_INDEX)
    return (indices[0::2] << 4) | indices[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` 4-bit indices of ``packed`` (inverse of :func:`pack_nibbles`), as uint8."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).view(-1)[:n]


def double_quantize_absmax(
    absmax: torch.Tensor, blocksize: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA §3 double quantization of the block constants: ``(codes uint8, scales fp32, offset fp32 scalar)``.

    ``offset = mean(absmax)``; ``absmax - offset`` is quantized with the dynamic 8-bit type in blocks of
    ``blocksize``. Costs ``8/64 + 32/(64*256)`` bits per weight instead of ``32/64``.
    """
    check_blocksize(blocksize, "absmax_blocksize")
    offset = absmax.float().mean()
    codes, scales = quantize_blockwise(absmax.float() - offset, dynamic_code_table(absmax.device), blocksize)
    return codes, scales, offset


def dequantize_absmax(
    codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """The fp32 block constants: ``scales[b // blocksize] * DYN[codes[b]] + offset``."""
    return dequantize_blockwise(codes, scales, dynamic_code_table(codes.device), blocksize) + offset


def nf4_storage_bytes(numel: int, blocksize: int = 64, absmax_blocksize: int = 256) -> int:
    """Exact bytes :func:`quantize_nf4` stores for ``numel`` weights (see the module docstring for the formula)."""
    num_blocks = math.ceil(numel / blocksize)
    return math.ceil(numel / 2) + num_blocks + 4 * math.ceil(num_blocks / absmax_blocksize) + 4 + 16 * 4


@dataclass(frozen=True)
class NF4Tensor:
    """A double-quantized NF4 tensor (see the module docstring for the layout)."""

    packed: torch.Tensor  # uint8 (ceil(n/2),)
    absmax_codes: torch.Tensor  # uint8 (ceil(n/blocksize),)
    absmax_scales: torch.Tensor  # fp32 (ceil(num_blocks/absmax_blocksize),)
    absmax_offset: torch.Tensor  # fp32 scalar
    code: torch.Tensor  # fp32 (16,), the NF4 table
    shape: torch.Size
    blocksize: int = 64
    absmax_blocksize: int = 256

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (equals :func:`nf4_storage_bytes`)."""
        tensors = (self.packed, self.absmax_codes, self.absmax_scales, self.absmax_offset, self.code)
        return sum(t.numel() * t.element_size() for t in tensors)

    def absmax(self) -> torch.Tensor:
        """The fp32 block constants ``c2`` after undoing the double quantization."""
        return dequantize_absmax(
            self.absmax_codes, self.absmax_scales, self.absmax_offset, self.absmax_blocksize
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole tensor in ``dtype`` and its original shape."""
        return dequantize_nf4_range(self, 0, self.numel, dtype).view(self.shape)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, absmax_blocksize: int = 256) -> NF4Tensor:
    """Quantize ``weight`` (any float dtype and device) to double-quantized NF4 (QLoRA §3).

    Works through the tensor ``2**16`` blocks at a time so the float temporaries stay small.
    """
    check_blocksize(blocksize)
    if not weight.is_floating_point():
        raise TypeError(f"Only floating-point tensors can be quantized to NF4, got {weight.dtype}.")
    if weight.numel() == 0:
        raise ValueError("Cannot quantize an empty tensor.")
    if weight.is_meta:
        raise ValueError("The tensor is on the meta device (no data); load the weights before quantizing.")
    if not torch.isfinite(weight).all():
        raise ValueError("The tensor contains NaN or inf values; NF4 absmax scaling needs finite weights.")
    flat = weight.detach().reshape(-1)
    code = nf4_code_table(weight.device)
    chunk = _QUANTIZE_CHUNK_BLOCKS * blocksize
    packed_parts, absmax_parts = [], []
    for start in range(0, flat.numel(), chunk):
        indices, absmax = quantize_blockwise(flat[start : start + chunk], code, blocksize)
        packed_parts.append(pack_nibbles(indices))
        absmax_parts.append(absmax)
    absmax_codes, absmax_scales, absmax_offset = double_quantize_absmax(
        torch.cat(absmax_parts), absmax_blocksize
    )
    return NF4Tensor(
        packed=torch.cat(packed_parts),
        absmax_codes=absmax_codes,
        absmax_scales=absmax_scales,
        absmax_offset=absmax_offset,
        code=code,
        shape=weight.shape,
        blocksize=blocksize,
        absmax_blocksize=absmax_blocksize,
    )


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2) table: byte ``v`` -> ``(code[v >> 4], code[v & 15])``, so one gather decodes a byte."""
    code = code.float()
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)


def dequantize_nf4_range(
    tensor: NF4Tensor,
    start: int,
    end: int,
    dtype: torch.dtype = torch.float32,
    absmax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat elements ``[start, end)`` of ``tensor`` in ``dtype``, decoding only the blocks that overlap them.

    ``absmax`` (the fp32 block constants) may be passed in when several ranges of one tensor are decoded.
    Values are computed in fp32 (``NF4[code] * c2``) and rounded to ``dtype`` once, as bitsandbytes does.
    """
    if not 0 <= start <= end <= tensor.numel:
        raise IndexError(f"range [{start}, {end}) is outside a tensor of {tensor.numel} elements")
    if absmax is None:
        absmax = tensor.absmax()
    bs = tensor.blocksize
    first_block, last_block = start // bs, -(-end // bs)
    byte_start, byte_end = first_block * bs // 2, min(last_block * bs // 2, tensor.packed.numel())
    pairs = _pair_table(tensor.code).index_select(0, tensor.packed[byte_start:byte_end].int())
    values = pairs.view(-1)
    span = (last_block - first_block) * bs
    if values.numel() < span:  # the tensor's last block is shorter than blocksize
        values = F.pad(values, (0, span - values.numel()))
    values = values.view(-1, bs).mul_(absmax[first_block:last_block].unsqueeze(1)).view(-1)
    offset = first_block * bs
    return values[start - offset : end - offset].to(dtype)
