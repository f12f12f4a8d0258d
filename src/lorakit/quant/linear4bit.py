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

The quantization state (``weight_nf4``, ``absmax_codes``, ``absmax_scales``, ``absmax_offset``, ``nf4_code``) is
registered on the module so ``state_dict`` round-trips through safetensors. It starts as buffers;
:meth:`Linear4bit.to_shardable` re-registers the three 1-D, size-proportional parts (``weight_nf4``,
``absmax_codes``, ``absmax_scales``) as frozen ``nn.Parameter`` objects under the same names, because FSDP2
(``fully_shard``) shards parameters and replicates buffers; the fp32 scalar ``absmax_offset`` and the 16-entry
``nf4_code`` table stay buffers (68 bytes per layer, replicated on every rank). Either way the state-dict keys,
order and values are the same. Under FSDP the sharded parts are ``DTensor`` shards outside the enclosing FSDP
module's forward/backward and the whole tensors inside it; decoding from shards is refused with an error.

``module.weight`` returns a :class:`QuantizedWeight` descriptor with the logical ``shape`` (out, in), ``dtype``
(the compute dtype) and ``device``, for code that only inspects those; ``module.dequantize()`` gives the actual
tensor.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.quant.nf4 import NF4Tensor, check_blocksize, dequantize_nf4_range, nf4_code_table, quantize_nf4

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "QUANT_STATE", "SHARDABLE_STATE", "Linear4bit", "QuantizedWeight"]

DEFAULT_CHUNK_ELEMENTS = 1 << 24
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANT_STATE = ("weight_nf4", "absmax_codes", "absmax_scales", "absmax_offset", "nf4_code")
"""Names of a :class:`Linear4bit`'s quantization state, in registration (and ``state_dict``) order."""
SHARDABLE_STATE = ("weight_nf4", "absmax_codes", "absmax_scales")
"""The 1-D parts that grow with the layer; :meth:`Linear4bit.to_shardable` makes them frozen parameters."""
_FP32_STATE = ("absmax_scales", "absmax_offset", "nf4_code")  # kept fp32 through model.to(dtype)


def _is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 shard), without importing ``torch.distributed.tensor``.

    That import costs about half a second; if the module is not loaded, no ``DTensor`` can exist.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


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
    For FSDP2, call :meth:`to_shardable` (or :func:`lorakit.quant.fsdp.make_shardable`) before ``fully_shard``.
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
        self._refuse_shards("load_quantized()")
        self.blocksize, self.absmax_blocksize = tensor.blocksize, tensor.absmax_blocksize
        values = (tensor.packed, tensor.absmax_codes, tensor.absmax_scales, tensor.absmax_offset, tensor.code)
        for name, value in zip(QUANT_STATE, values):
            if name in self._parameters:  # made shardable: stays a frozen parameter
                value = nn.Parameter(value, requires_grad=False)
            setattr(self, name, value)

    # ------------------------------------------------------------------------------------------ FSDP2 support
    @property
    def is_shardable(self) -> bool:
        """Whether :meth:`to_shardable` has run (the 1-D state is held in frozen parameters, not buffers)."""
        return all(name in self._parameters for name in SHARDABLE_STATE)

    def to_shardable(self) -> bool:
        """Re-register ``weight_nf4``, ``absmax_codes`` and ``absmax_scales`` as frozen ``nn.Parameter``s.

        FSDP2's ``fully_shard`` shards a module's parameters and replicates its buffers; as parameters, these three
        tensors (all but 68 bytes of the layer) are split along dim 0 across ranks, all-gathered (bytes unchanged,
        uint8 and fp32 alike) for the enclosing FSDP module's forward and backward, and freed again after. The
        same tensors are reused (no copy), under the same names and in the same ``state_dict`` order, so keys and
        values do not change and checkpoints load either way. ``requires_grad`` is False (an integer tensor cannot
        require grad; the base is frozen), so optimizers built from trainable parameters never see them and FSDP
        reduce-scatters no gradient for them. ``absmax_offset`` (a scalar) and ``nf4_code`` (16 values) stay
        buffers, replicated on every rank. Do not give FSDP a ``MixedPrecisionPolicy(param_dtype=...)`` for a
        group holding these: it would cast the fp32 scales; the layer decodes to its own ``compute_dtype``.

        Returns True if the layer was converted now, False if it already was. Must run before ``fully_shard``.
        """
        if self.is_shardable:
            return False
        self._refuse_shards("to_shardable()")
        for name in SHARDABLE_STATE:
            tensor = self._buffers.pop(name)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        return True

    def quant_state(self) -> dict[str, torch.Tensor]:
        """Name -> tensor of the quantization state as registered (buffers, parameters or FSDP ``DTensor`` shards).

        Code that counts or walks a model's parameters can use this to tell the packed 4-bit storage (which is
        not ``in * out`` parameters) from real weights.
        """
        return {name: getattr(self, name) for name in QUANT_STATE}

    def _refuse_shards(self, what: str) -> None:
        sharded = [name for name in SHARDABLE_STATE if _is_dtensor(getattr(self, name))]
        if sharded:
            raise RuntimeError(
                f"Linear4bit.{what} needs the whole quantization state, but {', '.join(sharded)} "
                f"{'are' if len(sharded) > 1 else 'is'} sharded by FSDP (DTensors holding 1/world_size of each "
                "on this rank). It is whole only "
                "inside the forward/backward of the enclosing fully_shard module; to use it outside, call "
                "unshard() on that FSDP module first (every rank) and reshard() after."
            )

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self)

    def quantized(self) -> NF4Tensor:
        """The stored quantization state as an :class:`NF4Tensor` (the registered tensors, no copy).

        Raises RuntimeError while the state is sharded by FSDP (outside the FSDP module's forward), rather than
        decoding a shard.
        """
        self._refuse_shards("quantized()")
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
        """Bytes of the whole quantized weight state (the bias is not included).

        The logical size, whether the state is in buffers, parameters or FSDP shards (a ``DTensor`` reports its
        global size); for what one rank holds use :func:`lorakit.quant.fsdp.resident_weight_bytes`.
        """
        return sum(t.numel() * t.element_size() for t in self.quant_state().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear4bit expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}."
            )
        if not torch.compiler.is_compiling():
            self._refuse_shards("forward()")
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
        the uint8 codes are never cast. Buffers and parameters (after :meth:`to_shardable`) alike: ``fn`` is
        replaced by a device move for the fp32 state only, so ``nn.Module._apply`` still updates parameters in
        place (same objects, which FSDP and optimizers hold on to).
        """
        probe32 = fn(torch.zeros((), device=self.nf4_code.device))
        probe16 = fn(torch.zeros((), dtype=torch.bfloat16, device=self.nf4_code.device))
        casts = probe32.dtype != torch.float32 or probe16.dtype != torch.bfloat16
        exact = [getattr(self, name) for name in _FP32_STATE]

        def keep_fp32(tensor: torch.Tensor) -> torch.Tensor:
            if any(tensor is state for state in exact):
                return tensor.to(probe32.device)
            return fn(tensor)

        super()._apply(keep_fp32, recurse)
        if casts and probe32.dtype in _COMPUTE_DTYPES:
            self.compute_dtype = probe32.dtype
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
        )
