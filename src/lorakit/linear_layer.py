"""LoRA over linear layers: ``nn.Linear``, GPT-2's ``Conv1D`` (weight stored (in, out)) and 4-bit Linear layers.

``h = W0 x + s B A dropout(x)`` with ``A`` (r x in) and ``B`` (out x r) as ``nn.Linear`` modules, computed by the
fused low-rank kernel (:func:`lorakit.lora_ops.lora_update_`). Initialisations (``init_lora_weights``):

* ``True``: ``A`` kaiming-uniform, ``B`` zero -- the model starts exactly at the base model (Hu et al. 2021);
* ``"gaussian"``: ``A`` normal with std ``1 / r``, ``B`` zero; ``False``: both random (for tests of merging);
* ``"pissa"`` / ``"pissa_niter_K"``, ``"olora"``: ``A`` and ``B`` from the base weight's SVD / QR, and the base
  weight becomes the residual ``W0 - s B A`` (so the model still starts at the base function);
* ``"loftq"``: the base is quantized to 4-bit NF4 jointly with ``A`` and ``B`` (LoftQ, Li et al. 2023) and
  becomes a :class:`~lorakit.quant.Linear4bit`. The math is in :mod:`lorakit.initializers`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit import initializers
from lorakit.layer_kinds import is_quantized_linear, linear_features
from lorakit.lora_layer import LoraLayer, init_factors
from lorakit.lora_ops import lora_update_, mixed_batch_update_, stack_adapters


class Linear(LoraLayer):
    """LoRA over ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``) or a 4-bit Linear."""

    kind = "linear"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_weights(self, name, r, dtype, device):
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, dtype=dtype, device=device)

    def _init_weights(self, name, init, options=None):
        kind, niter = initializers.parse_init(init)
        if kind in ("pissa", "olora", "loftq"):
            self._init_from_base(name, kind, niter, options or {})
        else:  # True, False (nn.Linear's own random init: a non-zero update, for tests of merging), "gaussian"
            init_factors(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def _init_from_base(self, name: str, kind: str, niter: int | None, options: dict) -> None:
        """PiSSA / OLoRA / LoftQ: factors from the base weight, and the base replaced by what remains."""
        r, scaling = self.r[name], self.scaling[name]
        with torch.no_grad():
            weight = self._to_rows(self.base_weight()).float()  # (out, in)
            if kind == "pissa":
                lora_A, lora_B, residual = initializers.pissa(weight, r, scaling, niter=niter)
            elif kind == "olora":
                lora_A, lora_B, residual = initializers.olora(weight, r, scaling)
            else:
                lora_A, lora_B, quantized = initializers.loftq(weight, r, scaling, **_loftq_options(options))
            self.lora_A[name].weight.copy_(lora_A)
            self.lora_B[name].weight.copy_(lora_B)
            if kind == "loftq":
                self._set_quantized_base(quantized)
            else:
                self._set_base_weight(residual)

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        """Replace the base weight by ``weight`` (out, in); a 4-bit base is quantized again."""
        base = self.base_layer
        if is_quantized_linear(base):
            warnings.warn(
                "Initialising from the weights of a 4-bit base layer: the residual is quantized again, which "
                "adds its own quantization error. Initialise in full precision and quantize afterwards to avoid it.",
                stacklevel=5,
            )
            base.load_quantized(_quantize_like(base, weight))
            return
        base.weight.data = self._from_rows(weight, base.weight).to(base.weight.dtype).contiguous()

    def _set_quantized_base(self, quantized) -> None:
        """LoftQ: the base becomes a 4-bit layer holding ``quantized`` (an :class:`~lorakit.quant.nf4.NF4Tensor`)."""
        from lorakit.quant.linear4bit import Linear4bit

        base = self.base_layer
        if is_quantized_linear(base):
            base.load_quantized(quantized)
            return
        dtype = base.weight.dtype if base.weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
        layer = Linear4bit(
            self.in_features, self.out_features, bias=False, compute_dtype=dtype, device="meta"
        )
        layer.load_quantized(quantized)  # the buffers of ``quantized``, on the base weight's device
        if base.bias is not None:
            layer.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
        self.base_layer = layer
        self.fan_in_fan_out = False  # a GPT-2 Conv1D base is now a (out, in) 4-bit Linear

    def delta_weight(self, name):
        delta = (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def _to_rows(self, weight):
        return weight.T if self.fan_in_fan_out else weight

    def _from_rows(self, rows, like):
        return rows.T if self.fan_in_fan_out else rows

    def lora_update(self, name, x, result):
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        weight_A, weight_B = self.lora_A[name].weight, self.lora_B[name].weight
        return lora_update_(result, x, weight_A, weight_B, self.scaling[name], p, self.training)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        wanted = set(self.row_adapters)
        names = sorted(n for n in self.r if n in wanted)
        if not names:
            return result
        weights = {n: (self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]) for n in names}
        # Rebuilt per call on purpose: a stack cached on the layer is allocated mid-forward and outlives it,
        # which pins glibc's heap and raised the mixed batch's peak resident memory by 0.5 GB (medium model).
        stacked = stack_adapters(weights, names)
        return mixed_batch_update_(result, x, self.row_adapters, names, stacked)


def _loftq_options(options: dict) -> dict:
    """``loftq_config`` (PEFT's ``LoftQConfig`` fields: ``loftq_bits``, ``loftq_iter``) as keyword arguments."""
    config = options.get("loftq_config") or {}
    if not isinstance(config, dict):
        config = vars(config)
    return {"num_bits": config.get("loftq_bits", 4), "num_iter": config.get("loftq_iter", 1)}


def _quantize_like(layer, weight: torch.Tensor):
    from lorakit.quant.nf4 import quantize_nf4

    return quantize_nf4(weight, blocksize=layer.blocksize)
