"""AdaLoRA layers: an update in SVD form ``P diag(E) Q`` over a frozen base layer.

AdaLoRA (Zhang et al. 2023, sec. 3.1, eq. 3) writes the update of a weight ``W0`` (out x in) as

    delta = B diag(E) A * lora_alpha / ranknum,    A: r x in,  E: r x 1,  B: out x r

with ``A`` the right and ``B`` the left singular vectors (kept near-orthogonal by a regularizer, eq. 4) and ``E``
the singular values; pruning a triplet ``(A_i, E_i, B_:,i)`` is setting ``E_i = 0``. As in PEFT, ``ranknum`` is
the rank the layer was created with (``init_r``), a frozen value that does not change when triplets are pruned,
and the divisor is ``ranknum + 1e-5``. Initialisation (PEFT's): ``A`` and ``B`` normal with std 0.02, ``E`` zero,
so the wrapped model starts exactly at the base model.

Parameter names are PEFT's: ``lora_A.<adapter>``, ``lora_E.<adapter>``, ``lora_B.<adapter>`` (plain parameters, no
``.weight``) and the frozen ``ranknum.<adapter>``, which is not saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layer_kinds import is_gpt2_conv1d, is_quantized_linear, linear_features
from lorakit.lora_layer import LoraLayer
from lorakit.lora_ops import lora_update_

RANKNUM_EPS = 1e-5


class AdaLoraLayer(LoraLayer):
    """Common state of an SVD-form layer: ``lora_A``, ``lora_E``, ``lora_B`` and ``ranknum`` per adapter."""

    method_label = "AdaLoRA"
    factor_names = ("lora_A", "lora_E", "lora_B")
    other_param_names = (*LoraLayer.other_param_names, "ranknum")

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranknum = nn.ParameterDict()

    def _a_columns(self) -> int:
        """Number of columns of ``A``: the flattened input size of one output feature."""
        return self.in_features

    def update_layer(
        self,
        name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init: bool | str = True,
        use_rslora: bool = False,
        use_dora: bool = False,
        *,
        ranknum: int | None = None,
        **options,
    ) -> None:
        """Add adapter ``name`` with ``r`` triplets; ``ranknum`` (default ``r``) fixes the scaling divisor.

        ``r == 0`` is allowed: a layer whose every triplet was pruned reloads as an empty update. The signature
        is :meth:`LoraLayer.update_layer`'s; rsLoRA and DoRA do not apply to AdaLoRA.
        """
        if use_rslora or use_dora:
            raise ValueError(
                "AdaLoRA does not combine with use_dora or use_rslora; use a LoraConfig for those."
            )
        if r < 0:
            raise ValueError(f"An AdaLoRA layer needs r >= 0 singular triplets, got {r}.")
        if name in self.r:
            raise ValueError(
                f"Adapter {name!r} already exists on this layer; delete it first or pick a new name."
            )
        dtype, device = self._adapter_dtype_device()
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_dropout[name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        factory = dict(dtype=dtype, device=device)
        self.lora_A[name] = nn.Parameter(torch.randn(r, self._a_columns(), **factory))
        self.lora_E[name] = nn.Parameter(torch.randn(r, 1, **factory))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, **factory))
        rank_value = torch.full((1,), float(r if ranknum is None else ranknum), **factory)
        self.ranknum[name] = nn.Parameter(rank_value, requires_grad=False)
        if init:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E[name])
                nn.init.normal_(self.lora_A[name], mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B[name], mean=0.0, std=0.02)
        if not self.active_adapters:
            self.active_adapters = [name]

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` active; their ``A``, ``E``, ``B`` require grad, ``ranknum`` never does."""
        super().set_adapter(names)
        for param in self.ranknum.values():
            param.requires_grad_(False)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise ValueError(
            "Mixed-adapter batches (adapter_names) are supported for LoRA adapters only, not for AdaLoRA."
        )

    def scaled(self, name: str, update: torch.Tensor) -> torch.Tensor:
        """``update * lora_alpha / (ranknum + 1e-5)`` (in PEFT's order of operations)."""
        return update * self.scaling[name] / (self.ranknum[name] + RANKNUM_EPS)

    def svd_product(self, name: str) -> torch.Tensor:
        """``B diag(E) A * lora_alpha / ranknum`` as an (out x r_columns) matrix."""
        return self.scaled(name, self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]))


class SVDLinear(AdaLoraLayer):
    """AdaLoRA over ``nn.Linear``, GPT-2's ``Conv1D`` (``fan_in_fan_out``) or a 4-bit Linear."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = linear_features(base_layer)

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.svd_product(name)
        return delta.T if self.fan_in_fan_out else delta

    def _to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def lora_update(self, name, x, result):
        """``result + dropout(x) (A * E)^T (B * alpha / (ranknum + 1e-5))^T`` through the fused kernel."""
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        weight_A = self.lora_A[name] * self.lora_E[name]
        weight_B = self.scaled(name, self.lora_B[name])
        return lora_update_(result, x, weight_A, weight_B, 1.0, p, self.training)


class SVDConv2d(AdaLoraLayer):
    """AdaLoRA over ``nn.Conv2d``: ``A`` is (r x in*kh*kw) and the update is reshaped to the kernel's shape."""

    def __init__(self, base_layer: nn.Conv2d):
        if base_layer.groups != 1:
            raise ValueError(
                f"AdaLoRA supports Conv2d with groups=1 only; this layer has groups={base_layer.groups}."
            )
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def _a_columns(self) -> int:
        kernel_h, kernel_w = self.base_layer.kernel_size
        return self.in_features * kernel_h * kernel_w

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.svd_product(name).reshape(self.base_layer.weight.shape)

    def _to_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.reshape(like.shape)

    def lora_update(self, name, x, result):
        base = self.base_layer
        x_adapter = self.lora_dropout[name](x.to(self.lora_A[name].dtype))
        kernel = self.delta_weight(name)
        update = F.conv2d(x_adapter, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return result + update.to(result.dtype)


def svd_supported(module: nn.Module) -> bool:
    """Whether AdaLoRA can wrap ``module``: a Linear, GPT-2 ``Conv1D``, 4-bit Linear or ``nn.Conv2d``."""
    return isinstance(module, (nn.Linear, nn.Conv2d)) or is_gpt2_conv1d(module) or is_quantized_linear(module)


def svd_unsupported_message(name: str, module: nn.Module, model: nn.Module | None = None) -> str:
    return (
        f"AdaLoRA cannot adapt {name!r}, a {type(module).__name__}: it supports nn.Linear, transformers "
        f"Conv1D, nn.Conv2d and lorakit's 4-bit Linear (not embeddings, unlike LoRA). Remove it from "
        f"target_modules, or use a LoraConfig for it."
    )


def check_svd_supported(module: nn.Module, module_name: str) -> None:
    """Raise a clear ``TypeError`` if AdaLoRA cannot wrap ``module``."""
    if not svd_supported(module):
        raise TypeError(svd_unsupported_message(module_name, module))


def make_svd_layer(module: nn.Module, module_name: str) -> AdaLoraLayer:
    """The AdaLoRA wrapper for ``module``'s type; a clear error for types AdaLoRA cannot wrap."""
    check_svd_supported(module, module_name)
    if is_gpt2_conv1d(module):
        return SVDLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Conv2d):
        return SVDConv2d(module)
    return SVDLinear(module, fan_in_fan_out=False)
