"""Packing several short examples into one sequence of at most ``max_length`` tokens.

Bins are filled by best-fit decreasing (longest example first, into the fullest sequence that still has room),
which is deterministic and wastes little space. A packed example is the concatenation of its parts'
``input_ids`` and ``labels``, plus ``position_ids`` that restart at 0 for every part. Given those positions and
no attention mask, transformers builds a block-diagonal causal mask, so a part attends only to itself and
its logits equal those it has alone (see :func:`lorakit.data.collate.model_inputs`).

The first token of every part is not a target (label -100): it has no context of its own, exactly as in an
unpacked example where the causal shift never predicts position 0. Every other label is kept.
"""

from __future__ import annotations

import bisect

from lorakit.data.tokenize import IGNORE_INDEX


def pack_examples(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack ``examples`` (dicts with input_ids and labels) into sequences of at most ``max_length`` tokens.

    An example already longer than ``max_length`` becomes a packed sequence of its own (nothing is cut here;
    truncation belongs to tokenization).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining room, bin index), sorted
    for index in order:
        length = len(examples[index]["input_ids"])
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            room, bin_index = free.pop(slot)
        else:
            room, bin_index = max(max_length, length), len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if room - length > 0:
            bisect.insort(free, (room - length, bin_index))
    return [_concatenate([examples[i] for i in members]) for members in bins]


def _concatenate(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for part in parts:
        ids = list(part["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(part["labels"][1:]) if ids else []
        position_ids += range(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
