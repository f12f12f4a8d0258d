"""The KV cache of a continuously batched decode: rows that joined at different times, in one tensor per layer.

A :class:`KVBatch` is a transformers ``DynamicCache`` (one ``DynamicLayer`` per decoder layer, keys and values
of shape ``(B, heads, W, head_dim)``) plus a mask ``(B, W)`` of the columns that hold a real token of the row.

Invariants (kept by every method here):

1. **Left padding only.** Row ``b``'s real tokens fill a contiguous suffix of the columns: ``mask[b]`` is
   ``0 ... 0 1 ... 1``. Padding columns hold zeros (:meth:`zero_padding` after a left-padded prefill) and are
   never attended to (the mask goes to the model as ``attention_mask``). Every decode step appends one real
   column to every row, so the suffix stays contiguous.
2. **Own positions.** The next token of row ``b`` gets position ``mask[b].sum()`` (its number of real tokens),
   so a row sees the same positions (RoPE) and the same keys as it would alone: padding changes nothing but
   the width of the attention. (transformers builds the causal part of the mask from column indices, the new
   column last, and ``attention_mask`` removes the padding columns.)
3. **No all-padding column.** Column 0 is real in at least one row (:meth:`trim` drops the leading columns
   that are padding in every row after rows leave). Hence ``W`` equals the longest row's length, and never
   exceeds the context the rows were admitted under.
4. **Shapes agree.** Every initialised layer has ``B`` rows and ``W`` columns, the mask has ``(B, W)``.

The caches are plain ``DynamicCache()`` objects (full-attention ``DynamicLayer`` s, never sliding-window ones,
which would drop columns on their own).

Operations: :meth:`extend` (admit the rows of another batch, e.g. a fresh prefill: the narrower side is padded
on the left), :meth:`keep` (drop finished rows by index-select, then :meth:`trim`), :meth:`step_inputs` /
:meth:`advance` (the ``attention_mask`` and ``position_ids`` of a one-token decode step, and the mask after it),
and :meth:`take` / :meth:`gather` (split rows into sub-batches and put them back, for adapters that cannot
share a forward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list:
    """The cache layers that hold tensors (a model sharing KV across layers leaves some uninitialised)."""
    return [
        layer for layer in cache.layers if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4
    ]


def _pad_left(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = (*tensor.shape[:-2], columns, tensor.shape[-1])
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


class KVBatch:
    """A batch of rows with their KV cache and real-token mask (see the module docstring for the invariants)."""

    def __init__(self, cache: DynamicCache | None = None, mask: torch.Tensor | None = None):
        self.cache = cache
        self.mask = mask  # (B, W) long, 1 = real token

    @classmethod
    def from_prefill(cls, cache: DynamicCache, length: int, device: torch.device | str) -> KVBatch:
        """One unpadded row of ``length`` tokens, as a batch-1 prefill leaves it."""
        return cls(cache, torch.ones(1, length, dtype=torch.long, device=device))

    # ---------------------------------------------------------------------------------------------- shape
    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def lengths(self) -> torch.Tensor:
        """Real tokens per row, ``(B,)``."""
        return self.mask.sum(dim=1)

    def check(self) -> None:
        """Assert invariants 1, 3 and 4 (for tests and debugging)."""
        if self.mask is None:
            return
        batch, width = self.mask.shape
        for layer in _layers(self.cache):
            assert layer.keys.shape[0] == batch and layer.keys.shape[-2] == width, (
                layer.keys.shape,
                batch,
                width,
            )
            assert layer.values.shape[0] == batch and layer.values.shape[-2] == width
        assert bool((self.mask[:, 1:] >= self.mask[:, :-1]).all()), "padding must be on the left"
        assert width == 0 or bool(self.mask[:, 0].any()), "column 0 must be real in some row"

    # ----------------------------------------------------------------------------------------- decode step
    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention_mask (B, W + 1), position_ids (B, 1))`` for feeding one new token per row."""
        ones = self.mask.new_ones(self.batch_size, 1)
        return torch.cat([self.mask, ones], dim=1), self.lengths().unsqueeze(1)

    def advance(self, attention_mask: torch.Tensor) -> None:
        """After the model appended one column per row: that step's ``attention_mask`` is the new mask."""
        self.mask = attention_mask

    def zero_padding(self) -> None:
        """Zero the keys and values of the padding columns (a left-padded prefill computed them for pad tokens)."""
        if self.batch_size == 0 or bool(self.mask.all()):
            return
        pad = (self.mask == 0)[:, None, :, None]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.masked_fill(pad.to(layer.keys.device), 0)
            layer.values = layer.values.masked_fill(pad.to(layer.values.device), 0)

    # ------------------------------------------------------------------------------------- row surgery
    def extend(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's; the narrower side gets zero columns on its left."""
        if other.batch_size == 0:
            return
        if self.batch_size == 0:
            self.cache, self.mask = other.cache, other.mask
            return
        width = max(self.width, other.width)
        pad_self, pad_other = width - self.width, width - other.width
        mine, theirs = _layers(self.cache), _layers(other.cache)
        if len(mine) != len(theirs):
            raise ValueError(f"Cannot merge caches of {len(mine)} and {len(theirs)} layers.")
        for dst, src in zip(mine, theirs):
            dst.keys = torch.cat([_pad_left(dst.keys, pad_self), _pad_left(src.keys, pad_other)], dim=0)
            dst.values = torch.cat([_pad_left(dst.values, pad_self), _pad_left(src.values, pad_other)], dim=0)
        self.mask = torch.cat(
            [_pad_left_mask(self.mask, pad_self), _pad_left_mask(other.mask, pad_other)], dim=0
        )

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), then :meth:`trim`. No rows left: the batch becomes empty."""
        if len(rows) == 0:
            self.cache, self.mask = None, None
            return
        if list(rows) == list(range(self.batch_size)):
            return
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
            layer.values = layer.values.index_select(0, index.to(layer.values.device))
        self.mask = self.mask.index_select(0, index)
        self.trim()

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row (restores invariant 3)."""
        if self.batch_size == 0:
            return
        real = self.mask.any(dim=0)
        start = int(real.int().argmax()) if bool(real.any()) else self.width
        if start == 0:
            return
        for layer in _layers(self.cache):
            layer.keys = layer.keys[..., start:, :].contiguous()
            layer.values = layer.values[..., start:, :].contiguous()
        self.mask = self.mask[:, start:]

    def take(self, rows: Sequence[int]) -> KVBatch:
        """A new batch holding copies of ``rows`` (trimmed); this batch is unchanged."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        layers = []
        for layer in self.cache.layers:
            copy = type(layer)()
            if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                copy.lazy_initialization(layer.keys, layer.values)
                copy.keys = layer.keys.index_select(0, index.to(layer.keys.device))
                copy.values = layer.values.index_select(0, index.to(layer.values.device))
            layers.append(copy)
        part = KVBatch(_cache_of(layers), self.mask.index_select(0, index))
        part.trim()
        return part

    @classmethod
    def gather(cls, parts: Sequence[KVBatch], rows: Sequence[Sequence[int]]) -> KVBatch:
        """Reassemble sub-batches: ``parts[g]`` holds the original rows ``rows[g]``; the result is in row order."""
        merged = cls()
        for part in parts:
            merged.extend(part)
        order = [row for group in rows for row in group]
        inverse = sorted(range(len(order)), key=order.__getitem__)
        merged.keep(inverse)
        merged.trim()
        return merged


def _pad_left_mask(mask: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], columns), mask], dim=1)


def _cache_of(layers: list) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache
