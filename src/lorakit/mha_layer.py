"""LoRA over ``nn.MultiheadAttention``: the packed ``in_proj_weight`` (q, k, v) and ``out_proj`` both adapted.

``nn.MultiheadAttention`` has no Linear sub-layer it calls: it hands ``in_proj_weight`` and ``out_proj.weight`` to
the attention kernel. So, as in PEFT, the adapter acts on the weights themselves::

    in_proj:  W_in  (3E x E)  ->  W_in  + s B_in A_in       A_in: r x E,  B_in: 3E x r
    out_proj: W_out (E x E)   ->  W_out + s B_out A_out     (a LoRA ``Linear`` that replaces ``out_proj``)

and the base attention runs with those weights (``torch.func.functional_call`` substitutes ``in_proj_weight`` for
the call; ``out_proj.weight`` already reads as the adapted weight). Gradients reach the adapters through the
substituted weights. ``lora_dropout`` has no effect here, since no adapter sees the input (PEFT: the same).

Parameter names are PEFT's: ``<attn>.lora_A.<adapter>.weight`` for in_proj and
``<attn>.base_layer.out_proj.lora_A.<adapter>.weight`` for out_proj, so files load both ways.

PEFT 0.21.2 adds the out_proj update twice (``MultiheadAttention.merge`` writes ``W_out + dW`` and then calls
``out_proj.merge()``, which adds ``dW`` again; its forward merges for every call), so PEFT computes with
``W_out + 2 s B_out A_out``; the bug is known upstream (huggingface/peft pull request 3774). lorakit applies the
update once, as the formula says. An adapter trained with PEFT 0.21.2 gives PEFT's outputs in lorakit after its
out_proj ``lora_B`` is multiplied by 2.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.linear_layer import Linear
from lorakit.lora_layer import LoraLayer, init_factors


class OutProjection(Linear):
    """LoRA on the ``out_proj`` of a wrapped ``nn.MultiheadAttention``, which reads ``out_proj.weight`` and
    ``out_proj.bias`` instead of calling the layer: ``weight`` is ``W0 + sum of active s B A`` (``W0`` alone when
    merged or disabled). Owned by :class:`MultiheadAttention`, which adds, switches, merges and disables its
    adapters along with its own; doing so again on this layer directly is harmless.
    """

    @property
    def weight(self) -> torch.Tensor:
        base = self.base_layer.weight
        if self.disable_adapters or self.merged:
            return base
        names = self._adapters_to_run()
        if not names:
            return base
        delta = sum(self.delta_weight(name) for name in names)
        return base + delta.to(base.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class MultiheadAttention(LoraLayer):
    """LoRA over ``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (query, key and value of size E).

    It reads like the attention it wraps (``embed_dim``, ``batch_first``, ``in_proj_weight``, ``out_proj``, ...),
    so code that inspects the attention module, such as ``nn.TransformerEncoderLayer``'s fast path, sees the
    adapted weights.
    """

    def __init__(self, base_layer: nn.MultiheadAttention):
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                "LoRA on nn.MultiheadAttention supports query, key and value of the same size only (one packed "
                f"in_proj_weight); this layer has kdim={base_layer.kdim}, vdim={base_layer.vdim} and "
                f"embed_dim={base_layer.embed_dim}."
            )
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(
                f"out_proj must be an nn.Linear for LoRA on MultiheadAttention, got {type(base_layer.out_proj)}."
            )
        super().__init__(base_layer)
        self.fan_in_fan_out = False
        self.in_features, self.out_features = base_layer.embed_dim, 3 * base_layer.embed_dim
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        base_layer.out_proj = OutProjection(base_layer.out_proj)

    kind = "mha"

    # in_proj's adapter is a Linear's: same weights and delta
    _create_weights = Linear._create_weights
    delta_weight = Linear.delta_weight

    def _init_weights(self, name, init, options=None):
        if init in ("loftq", "pissa", "olora") or str(init).startswith("pissa_niter_"):
            raise ValueError(
                f"init_lora_weights={init!r} is not supported on nn.MultiheadAttention (its adapters act on the "
                "packed in_proj weight); use True or 'gaussian', or leave the attention module out of target_modules."
            )
        init_factors(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    # --------------------------------------------------------------------- what nn.MultiheadAttention exposes
    @property
    def out_proj(self) -> OutProjection:
        return self.base_layer.out_proj

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """``W_in + sum of active s B A`` (``W_in`` alone when merged or disabled)."""
        base = self.base_layer.in_proj_weight
        names = [] if (self.disable_adapters or self.merged) else self._adapters_to_run()
        if not names:
            return base
        return base + sum(self.delta_weight(name) for name in names).to(base.dtype)

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.base_layer.in_proj_bias

    @property
    def embed_dim(self) -> int:
        return self.base_layer.embed_dim

    @property
    def kdim(self) -> int:
        return self.base_layer.kdim

    @property
    def vdim(self) -> int:
        return self.base_layer.vdim

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return self.base_layer._qkv_same_embed_dim

    @property
    def num_heads(self) -> int:
        return self.base_layer.num_heads

    @property
    def head_dim(self) -> int:
        return self.base_layer.head_dim

    @property
    def dropout(self) -> float:
        return self.base_layer.dropout

    @property
    def batch_first(self) -> bool:
        return self.base_layer.batch_first

    @property
    def bias_k(self) -> torch.Tensor | None:
        return self.base_layer.bias_k

    @property
    def bias_v(self) -> torch.Tensor | None:
        return self.base_layer.bias_v

    @property
    def add_zero_attn(self) -> bool:
        return self.base_layer.add_zero_attn

    def merge_masks(self, *args, **kwargs):
        return self.base_layer.merge_masks(*args, **kwargs)

    # ------------------------------------------------------------- adapters: in_proj here, out_proj delegated
    @property
    def disable_adapters(self) -> bool:
        return self._adapters_disabled

    @disable_adapters.setter
    def disable_adapters(self, value: bool) -> None:
        self._adapters_disabled = value
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, OutProjection):  # not yet during __init__
            out_proj.disable_adapters = value

    def update_layer(
        self, name, r, lora_alpha, lora_dropout=0.0, init=True, use_rslora=False, use_dora=False, **options
    ):
        if lora_dropout > 0:
            warnings.warn(
                "lora_dropout has no effect on nn.MultiheadAttention: its adapters act on the weights, not on "
                "the input.",
                stacklevel=3,
            )
        super().update_layer(name, r, lora_alpha, lora_dropout, init, use_rslora, use_dora, **options)
        self.out_proj.update_layer(name, r, lora_alpha, lora_dropout, init, use_rslora, use_dora, **options)

    def set_adapter(self, names: str | list[str]) -> None:
        super().set_adapter(names)
        self.out_proj.set_adapter(names)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.out_proj.delete_adapter(name)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold ``s B A`` into ``in_proj_weight`` and ``out_proj.weight`` (both or, with ``safe_merge``, neither)."""
        weight = self.base_layer.in_proj_weight
        for name in adapter_names or self.active_adapters:
            if name not in self.r:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"Adapter {name!r} is already merged; not merging it twice.", stacklevel=2)
                continue
            merged = (weight.data.float() + self.delta_weight(name).detach().float()).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging adapter {name!r} gives NaN or inf weights; the adapter is broken.")
            if name not in self.out_proj.merged_adapters:  # a layer-by-layer loop may have merged it already
                # a failing safe merge raises before changing anything, so in_proj stays unmerged too
                self.out_proj.merge(safe_merge=safe_merge, adapter_names=[name])
            weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.in_proj_weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            restored = weight.data.float() - self.delta_weight(name).detach().float()
            weight.data.copy_(restored.to(weight.dtype))
        self.out_proj.unmerge()

    def unwrap(self, merge: bool, safe_merge: bool = False) -> nn.MultiheadAttention:
        """The base attention with its plain ``out_proj`` back, the active adapters merged in or not."""
        if merge:
            self.merge(safe_merge=safe_merge)
        elif self.merged:
            self.unmerge()
        base = self.base_layer
        base.out_proj = base.out_proj.base_layer
        return base

    def forward(self, query: torch.Tensor, *args, **kwargs):
        """``nn.MultiheadAttention.forward`` with the adapted ``in_proj_weight`` (out_proj reads adapted itself)."""
        if self.row_adapters is not None:
            raise ValueError(
                "Mixed-adapter batches (adapter_names) are supported on Linear and Embedding layers only."
            )
        if self.disable_adapters and self.merged:
            self.unmerge()
        weights = {"in_proj_weight": self.in_proj_weight}
        return torch.func.functional_call(self.base_layer, weights, (query, *args), kwargs)
