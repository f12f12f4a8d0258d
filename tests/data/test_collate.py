"""Padding to the longest example: pad ids, attention mask 0, labels -100; the loss ignores padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorakit.data import IGNORE_INDEX, collate, model_inputs

A = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}
B = {"input_ids": [9, 10], "labels": [9, 10]}


def test_collate_pads_right_with_mask_zero_and_label_minus_100():
    batch = collate([A, B], pad_token_id=3)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}


def test_packed_examples_get_position_ids_with_padding_as_its_own_run():
    packed = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]}
    short = {"input_ids": [4], "labels": [-100], "position_ids": [0]}
    batch = collate([packed, short], pad_token_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert set(model_inputs(batch)) == {"input_ids", "position_ids", "use_cache"}


def test_padded_batch_loss_equals_per_example_losses():
    from tests.conftest import tiny_llama

    model = tiny_llama(seed=2)
    batch = collate([A, B], pad_token_id=0)

    def loss_sum(ids, labels, mask=None):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
        )

    with torch.no_grad():
        together = loss_sum(batch["input_ids"], batch["labels"], batch["attention_mask"])
        apart = sum(loss_sum(torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])) for e in (A, B))
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_collate_errors():
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([A], None)
    with pytest.raises(ValueError, match="4 input_ids but 3 labels"):
        collate([{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3]}], 0)
