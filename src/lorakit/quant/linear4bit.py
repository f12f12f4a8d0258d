"""A frozen NF4 linear layer for QLoRA (Dettmers et al. 2023, §3, eq. 5 with the LoRA term added outside).

``Linear4bit`` computes ``y = x W^T + b`` where ``W`` is stored double-quantized in NF4 (see
:mod:`lorakit.quant.nf4`) and dequantized block-wise on the fly in ``compute_dtype`` (bf16, fp16 or fp32):

* **forward** decodes ``W`` (or, for large layers, slices of its rows) into a temporary, multiplies, and drops it;
* **backward** (custom autograd function) needs only ``dL/dx = dL/dy W`` -- ``W`` is frozen, so no ``dL/dW`` --
  and decodes ``W`` again instead of keeping the forward's copy. Nothing of size ``out x in`` is saved for
  backward, neither ``W`` nor (since ``dL/dW`` is never formed) anything derived from it.

Memory/speed trade-off: a layer with at most ``chunk_elements`` weights (default ``2**24``) is decoded in one
piece per call, a transient ``out * in * (2 or 4)`` bytes plus an fp32 temporary of the same count; larger layers
are processed in slices of whole output rows (``y[..., rows] = x W[rows]^T``; ``dL/dx = sum dL/dy[..., rows]
W[rows]``), so the transient stays under ``chunk_elements`` weights at the cost of more, smaller matmuls. Decoding
costs one table gather and one multiply per weight on every forward and backward call: QLoRA trades compute for
memory.

The quantization state lives in buffers (``weight_nf4``, ``absmax_codes``, ``absmax_scales``, ``absmax_offset``,
``nf4_code``) so ``state_dict`` round-trips through safetensors. ``module.weight`` returns a
:class:`QuantizedWeight` descriptor with the logical ``shape`` (out, in), ``dtype`` (the compute dtype) and
``device``, for code that only inspects those; ``module.dequantize()`` gives the actual tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.quant.nf4 import NF4Tensor, check_blocksize, dequantize_nf4_range, nf4_code_table, quantize_nf4

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "Linear4bit", "QuantizedWeight"]

DEFAULT_CHUNK_ELEMENTS = 1 << 24
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FP32_STATE = ("absmax_scales", "absmax_offset", "nf4_code")  # kept fp32 through model.to(dtype)


def _row_slices(tensor: NF4Tensor, chunk_elements: int) -> list[tuple[int, int]]:
    out_features, in_features = tensor.shape
    rows = max(1, chunk_elements // in_features)
    return [(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]


def _decode_rows(
    tensor: NF4Tensor, start: int, end: int, dtype: torch.dtype, absmax: torch.Tensor
) -> torch.Tensor:
    in_features = tensor.shape[1]
    flat = dequantize_nf4_range(tensor, start * in_features, end * in_features, dtype, absmax)
    return flat.view(end - start, in_features)


def nf4_matmul(x: torch.Tensor, tensor: NF4Tensor, chunk_elements: int) -> torch.Tensor:
    """``x W^T`` with ``W`` decoded in ``x.dtype``, in row slices of at most ``chunk_elements`` weights."""
    absmax = tensor.absmax()
    slices = _row_slices(tensor, chunk_elements)
    if len(slices) == 1:
        return F.linear(x, _decode_rows(tensor, 0, tensor.shape[0], x.dtype, absmax))
    out = x.new_empty(*x.shape[:-1], tensor.shape[0])
    for start, end in slices:
        out[..., start:end] = F.linear(x, _decode_rows(tensor, start, end, x.dtype, absmax))
    return out


def nf4_matmul_transposed(grad: torch.Tensor, tensor: NF4Tensor, chunk_elements: int) -> torch.Tensor:
    """``grad W`` (the input gradient of ``x W^T``), decoding ``W`` again in row slices."""
    absmax = tensor.absmax()
    result = None
    for start, end in _row_slices(tensor, chunk_elements):
        part = grad[..., start:end] @ _decode_rows(tensor, start, end, grad.dtype, absmax)
        result = part if result is None else result.add_(part)
    return result


class _NF4LinearFunction(torch.autograd.Function):
    """``x W^T`` for a frozen NF4 ``W``: saves only references to the quantized buffers, not a decoded ``W``."""

    @staticmethod
    def forward(ctx, x, packed, absmax_codes, absmax_scales, absmax_offset, code, layout):
        shape, blocksize, absmax_blocksize, chunk_elements = layout
        ctx.layout = layout
        ctx.save_for_backward(packed, absmax_codes, absmax_scales, absmax_offset, code)
        tensor = NF4Tensor(
            packed, absmax_codes, absmax_scales, absmax_offset, code, shape, blocksize, absmax_blocksize
        )
        return nf4_matmul(x, tensor, chunk_elements)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        shape, blocksize, absmax_blocksize, chunk_elements = ctx.layout
        tensor = NF4Tensor(*ctx.saved_tensors, shape, blocksize, absmax_blocksize)
        return (nf4_matmul_transposed(grad_out, tensor, chunk_elements),) + (None,) * 6


class QuantizedWeight:
    """What ``Linear4bit.weight`` returns: the logical shape/dtype/device of the 4-bit weight, no data.

    ``shape`` is ``(out_features, in_features)`` and ``dtype`` the compute dtype, so code that sizes or places
    other tensors from ``layer.weight`` keeps working; use :meth:`dequantize` (or ``layer.dequantize()``) for values.
    """

    requires_grad = False
    is_quantized = True

    def __init__(self, layer: Linear4bit):
        self._layer = layer

    shape = property(lambda self: torch.Size((self._layer.out_features, self._layer.in_features)))
    dtype = property(lambda self: self._layer.compute_dtype)
    device = property(lambda self: self._layer.weight_nf4.device)
    ndim = 2

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        return self._layer.out_features * self._layer.in_features

    def dequantize(self) -> torch.Tensor:
        return self._layer.dequantize()

    def __repr__(self) -> str:
        return f"QuantizedWeight(nf4, shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"


class Linear4bit(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in double-quantized NF4 (about 4.127 bits per weight).

    Build one with :meth:`from_linear`; the constructor makes an empty (all-zero) layer of the right shape, e.g.
    to ``load_state_dict`` into. The bias, if any, stays a (frozen) floating-point parameter.
    Inputs are cast to ``compute_dtype`` for the matmul and the output is cast back to the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        absmax_blocksize: int = 256,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype}.")
        check_blocksize(blocksize)
        check_blocksize(absmax_blocksize, "absmax_blocksize")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.blocksize, self.absmax_blocksize = blocksize, absmax_blocksize
        self.chunk_elements = DEFAULT_CHUNK_ELEMENTS
        n = in_features * out_features
        num_blocks = math.ceil(n / blocksize)
        self.register_buffer("weight_nf4", torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.zeros(num_blocks, dtype=torch.uint8, device=device))
        scales = torch.zeros(math.ceil(num_blocks / absmax_blocksize), device=device)
        self.register_buffer("absmax_scales", scales)
        self.register_buffer("absmax_offset", torch.zeros((), device=device))
        self.register_buffer("nf4_code", nf4_code_table(device))
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, device=device, dtype=bias_dtype or compute_dtype)
            )
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64
    ) -> Linear4bit:
        """Quantize ``linear.weight`` to NF4 on its device; the bias parameter is reused as it is (frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear needs an nn.Linear, got {type(linear).__name__}.")
        return cls.from_weight(linear.weight, linear.bias, compute_dtype=compute_dtype, blocksize=blocksize)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: nn.Parameter | None = None,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
    ) -> Linear4bit:
        """A layer computing ``x weight^T + bias`` for an (out, in) ``weight``, quantized to NF4 on its device."""
        if weight.dim() != 2:
            raise ValueError(
                f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}."
            )
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            bias=False,
            compute_dtype=compute_dtype,
            blocksize=blocksize,
            device="meta",
        )
        with torch.no_grad():
            layer.load_quantized(quantize_nf4(weight, blocksize=blocksize))
        if bias is not None:
            layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach())
            layer.bias.requires_grad_(False)
        return layer

    def load_quantized(self, tensor: NF4Tensor) -> None:
        """Take over the buffers of an :class:`NF4Tensor` of shape (out_features, in_features)."""
        expected = torch.Size((self.out_features, self.in_features))
        if tensor.shape != expected:
            raise ValueError(
                f"NF4 tensor of shape {tuple(tensor.shape)} does not fit a layer of {tuple(expected)}."
            )
        self.blocksize, self.absmax_blocksize = tensor.blocksize, tensor.absmax_blocksize
        self.weight_nf4, self.absmax_codes = tensor.packed, tensor.absmax_codes
        self.absmax_scales, self.absmax_offset = tensor.absmax_scales, tensor.absmax_offset
        self.nf4_code = tensor.code

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self)

    def quantized(self) -> NF4Tensor:
        """The stored quantization state as an :class:`NF4Tensor` (views of the buffers, no copy)."""
        return NF4Tensor(
            self.weight_nf4,
            self.absmax_codes,
            self.absmax_scales,
            self.absmax_offset,
            self.nf4_code,
            torch.Size((self.out_features, self.in_features)),
            self.blocksize,
            self.absmax_blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in ``dtype`` (default: the compute dtype); a new tensor on every call."""
        return self.quantized().dequantize(dtype or self.compute_dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight state (all buffers; the bias is not included)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}."
            )
        layout = (
            torch.Size((self.out_features, self.in_features)),
            self.blocksize,
            self.absmax_blocksize,
            self.chunk_elements,
        )
        out = _NF4LinearFunction.apply(
            x.to(self.compute_dtype),
            self.weight_nf4,
            self.absmax_codes,
            self.absmax_scales,
            self.absmax_offset,
            self.nf4_code,
            layout,
        )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (in ``dtype``, default the compute dtype)."""
        weight = self.dequantize(dtype)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            dtype=weight.dtype,
            device=weight.device,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves everything; ``.to(dtype)``/``.half()`` change the compute dtype and the bias only.

        The fp32 parts of the quantization state stay fp32 (rounding them to 16 bits would change the weights),
        the uint8 codes are never cast.
        """
        probe32 = fn(torch.zeros((), device=self.nf4_code.device))
        probe16 = fn(torch.zeros((), dtype=torch.bfloat16, device=self.nf4_code.device))
        casts = probe32.dtype != torch.float32 or probe16.dtype != torch.bfloat16
        exact = {name: self._buffers.pop(name) for name in _FP32_STATE}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buffer in exact.items():
                self._buffers[name] = buffer.to(probe32.device)
        if casts and probe32.dtype in _COMPUTE_DTYPES:
            self.compute_dtype = probe32.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )
