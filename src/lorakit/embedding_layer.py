"""LoRA over ``nn.Embedding``: ``E' = E + scaling * (B A)^T`` with ``A`` (r x vocab) and ``B`` (dim x r).

As in PEFT, ``A`` starts at zero and ``B`` normal (the reverse of Linear), so the update is zero at start; the
parameters are ``lora_embedding_A.<adapter>`` and ``lora_embedding_B.<adapter>`` (no ``.weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.lora_layer import LoraLayer


class Embedding(LoraLayer):
    """LoRA over ``nn.Embedding`` (see the module docstring)."""

    kind = "embedding"
    factor_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_weights(self, name, r, dtype, device):
        self.lora_embedding_A[name] = nn.Parameter(
            torch.randn(r, self.in_features, dtype=dtype, device=device)
        )
        self.lora_embedding_B[name] = nn.Parameter(
            torch.randn(self.out_features, r, dtype=dtype, device=device)
        )

    def _init_weights(self, name, init, options=None):
        if init is False:
            return
        if init == "loftq":
            raise ValueError(
                "LoftQ initialises Linear layers (it quantizes their weights); this target is an nn.Embedding. "
                "Leave embeddings out of target_modules, or use init_lora_weights=True for them."
            )
        # PiSSA, OLoRA and "gaussian" are defined for Linear layers; embeddings keep PEFT's default init
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name):
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def _to_rows(self, weight):
        return weight.T  # rows = embedding dimensions, as PEFT's DoRA for embeddings

    def _from_rows(self, rows, like):
        return rows.T

    def _embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(
            input_ids,
            weight,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )

    def embedding_update(self, name: str, input_ids: torch.Tensor) -> torch.Tensor:
        """``s (B A)^T[input_ids]``: row ``input_ids`` of ``A^T``, then ``B``."""
        embedding_A = self.lora_embedding_A[name]
        return (self._embed(input_ids, embedding_A.T) @ self.lora_embedding_B[name].T) * self.scaling[name]

    def lora_update(self, name, x, result):
        return result + self.embedding_update(name, x).to(result.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result + self._mixed_batch_update(x).to(result.dtype)

    def _mixed_batch_update(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-row adapter: gather each token's row of ``A^T`` from the row's adapter, then one ``bmm`` with B."""
        names = sorted(n for n in set(self.row_adapters) if n in self.r)
        dtype = self._adapter_dtype_device()[0]
        batch = input_ids.shape[0]
        if not names:
            return torch.zeros(*input_ids.shape, self.out_features, dtype=dtype, device=input_ids.device)
        max_r = max(self.r[n] for n in names)
        tables = input_ids.new_zeros((len(names) + 1, self.in_features, max_r), dtype=dtype)
        stacked_B = input_ids.new_zeros((len(names) + 1, self.out_features, max_r), dtype=dtype)
        for slot, name in enumerate(names):
            tables[slot, :, : self.r[name]] = self.lora_embedding_A[name].T
            stacked_B[slot, :, : self.r[name]] = self.lora_embedding_B[name] * self.scaling[name]
        slot_of = {name: slot for slot, name in enumerate(names)}
        index = torch.tensor([slot_of.get(n, len(names)) for n in self.row_adapters], device=input_ids.device)
        ids = input_ids.reshape(batch, -1)
        after_A = tables[index[:, None], ids]  # (batch, tokens, r)
        update = torch.bmm(after_A, stacked_B[index].transpose(1, 2))
        return update.reshape(*input_ids.shape, self.out_features)
