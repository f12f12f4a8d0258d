"""Packing keeps every token and label, restarts positions, and isolates examples in attention."""

from __future__ import annotations

import torch

from lorakit.data import IGNORE_INDEX, collate, model_inputs, pack_examples
from tests.conftest import tiny_llama


def _example(start: int, length: int, prompt: int) -> dict[str, list[int]]:
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


EXAMPLES = [
    _example(10, 5, 2),
    _example(20, 7, 3),
    _example(40, 3, 1),
    _example(50, 4, 0),
    _example(60, 2, 0),
]


def test_best_fit_decreasing_bins_are_as_computed_by_hand():
    packed = pack_examples(EXAMPLES, max_length=10)
    # lengths 5, 7, 3, 4, 2 -> sorted 7, 5, 4, 3, 2; best fit: [7, 3], [5, 4], [2]
    assert [p["input_ids"] for p in packed] == [
        [*range(20, 27), *range(40, 43)],
        [*range(10, 15), *range(50, 54)],
        [60, 61],
    ]
    assert packed[0]["position_ids"] == [*range(7), *range(3)]


def test_packing_preserves_tokens_and_labels_except_each_parts_first_label():
    packed = pack_examples(EXAMPLES, max_length=10)
    assert all(len(p["input_ids"]) <= 10 for p in packed)
    assert all(len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) for p in packed)
    parts = []
    for p in packed:
        starts = [i for i, position in enumerate(p["position_ids"]) if position == 0] + [len(p["input_ids"])]
        parts += [(p["input_ids"][a:b], p["labels"][a:b]) for a, b in zip(starts, starts[1:])]
    assert sorted(ids for ids, _ in parts) == sorted(e["input_ids"] for e in EXAMPLES)
    by_first = {e["input_ids"][0]: e for e in EXAMPLES}
    for ids, labels in parts:
        original = by_first[ids[0]]
        assert labels[0] == IGNORE_INDEX and labels[1:] == original["labels"][1:]
    total_targets = sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in EXAMPLES)
    assert sum(sum(label != IGNORE_INDEX for label in p["labels"]) for p in packed) == total_targets


def test_an_example_longer_than_the_limit_stays_whole_and_alone():
    packed = pack_examples([_example(0, 12, 1), _example(30, 2, 0)], max_length=10)
    assert [len(p["input_ids"]) for p in packed] == [12, 2]


def test_packed_forward_gives_each_part_the_logits_it_has_alone():
    model = tiny_llama(seed=1)
    examples = [_example(3, 6, 2), _example(40, 5, 1), _example(70, 4, 0), _example(90, 9, 3)]
    packed = pack_examples(examples, max_length=12)
    assert len(packed) < len(examples)
    batch = collate(packed, pad_token_id=0)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for row, sequence in enumerate(packed):
            positions = sequence["position_ids"]
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for a, b in zip(starts, starts[1:]):
                alone = model(torch.tensor([sequence["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(logits[row, a:b], alone, rtol=1e-5, atol=1e-5)
    # with the plain attention mask instead, later parts would see earlier ones
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(leaky, logits, atol=1e-4)
