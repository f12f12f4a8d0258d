"""Batching examples into padded tensors, and the model inputs for a batch."""

from __future__ import annotations

from typing import Any

import torch

from lorakit.data.tokenize import IGNORE_INDEX


def collate(examples: list[dict[str, list[int]]], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on tokens, 0 on padding) and
    ``labels`` (-100 on padding, so padding never enters the loss); plus ``position_ids`` when the examples
    are packed (they restart at 0 for every part; the padding gets its own run 0, 1, ...).
    """
    if not examples:
        raise ValueError("collate() needs at least one example")
    if pad_token_id is None:
        raise ValueError("collate() needs a pad_token_id: set tokenizer.pad_token (e.g. to the eos token)")
    width = max(len(e["input_ids"]) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
        "labels": torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long),
    }
    packed = all("position_ids" in e for e in examples)
    if packed:
        batch["position_ids"] = torch.arange(width).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        if len(example["labels"]) != length:
            raise ValueError(f"example {row}: {length} input_ids but {len(example['labels'])} labels")
        batch["input_ids"][row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        batch["attention_mask"][row, :length] = 1
        batch["labels"][row, :length] = torch.tensor(example["labels"], dtype=torch.long)
        if packed:
            batch["position_ids"][row, :length] = torch.tensor(example["position_ids"], dtype=torch.long)
            batch["position_ids"][row, length:] = torch.arange(width - length)
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments for ``model(**...)``: input_ids with attention_mask, or, for packed batches,
    input_ids with position_ids, no attention mask and no KV cache.

    Without a mask and a cache, transformers (``masking_utils.find_packed_sequence_indices``) reads the
    restarting position ids as separate sequences and builds a block-diagonal causal mask. The right padding
    needs no mask there: under causal attention no real token can attend to a later padding token.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
