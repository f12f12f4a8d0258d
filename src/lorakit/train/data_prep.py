"""Training and held-out data for a run, through the public ``lorakit.data`` API.

Sources: ``dataset`` (or the bundled sample when empty) and ``eval_dataset``; without an eval file a
seeded ``eval_split`` fraction of the training records is held out. Examples whose labels carry no
trained token after truncation are dropped and counted; an empty result is an error before training.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorakit.data import DatasetError, load_records, pack_examples, sample_dataset, tokenize_records
from lorakit.train.batching import IGNORE_INDEX
from lorakit.train.config import TrainConfig


@dataclass
class PreparedData:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    eval_records: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def split_records(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then ``ceil(fraction * n)`` records held out (at least one train record kept)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = min(math.ceil(fraction * len(records)), len(records) - 1)
    held_set = set(order[:held])
    return [r for i, r in enumerate(records) if i not in held_set], [records[i] for i in sorted(held_set)]


def _has_trained_token(example: dict[str, list[int]]) -> bool:
    return any(label != IGNORE_INDEX for label in example["labels"][1:])


def _tokenize(
    records: list[dict], tokenizer: Any, config: TrainConfig, source: str
) -> tuple[list[dict], dict]:
    tokenized = tokenize_records(
        records,
        tokenizer,
        fmt=config.dataset_format,
        max_length=config.max_seq_length,
        train_on_prompt=config.train_on_prompt,
        source=source,
    )
    kept = [e for e in tokenized.examples if _has_trained_token(e)]
    stats = dict(tokenized.stats)
    stats["num_dropped_no_target"] = len(tokenized.examples) - len(kept)
    return kept, stats


def prepare_data(config: TrainConfig, tokenizer: Any, say: Callable[[str], None] = print) -> PreparedData:
    """Load, split, tokenize (and optionally pack) the run's data, reporting truncation counts."""
    if config.dataset is None:
        train_path, eval_path = sample_dataset()
        train_source, eval_source = str(train_path), config.eval_dataset or str(eval_path)
    else:
        train_source, eval_source = config.dataset, config.eval_dataset
    train_records = load_records(train_source)
    if eval_source is not None:
        eval_records = load_records(eval_source)
    else:
        train_records, eval_records = split_records(train_records, config.eval_split, config.seed)
    train, train_stats = _tokenize(train_records, tokenizer, config, train_source)
    evaluation, eval_stats = (
        _tokenize(eval_records, tokenizer, config, eval_source or "") if eval_records else ([], {})
    )
    if not train:
        raise DatasetError(
            f"{train_source}: no example has a trained token within max_seq_length={config.max_seq_length}; "
            "raise max_seq_length or set train_on_prompt: true."
        )
    if config.packing:
        train = pack_examples(train, config.max_seq_length)
    for name, stats, count in (("train", train_stats, len(train)), ("eval", eval_stats, len(evaluation))):
        if stats:
            say(
                f"{name}: {stats.get('num_examples', count)} examples "
                f"({stats.get('num_truncated', 0)} truncated to {config.max_seq_length} tokens, "
                f"{stats['num_dropped_no_target']} without a target dropped), "
                f"{stats.get('num_trainable_tokens', 0):,} trained tokens"
                + (f", packed into {count} sequences" if name == "train" and config.packing else "")
            )
    return PreparedData(train, evaluation, eval_records, {"train": train_stats, "eval": eval_stats})
