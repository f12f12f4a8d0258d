"""Training and held-out data for a run, through the public ``lorakit.data`` API.

Sources: ``dataset`` (or the bundled sample when empty; split ``dataset_split``, subset ``dataset_config``)
and ``eval_dataset`` or the ``eval_dataset_split`` of ``dataset``; without either a seeded ``eval_split``
fraction of the training records is held out. ``column_mapping`` renames columns of the user's sources
(never of the bundled sample). Examples whose labels carry no trained token after truncation are
dropped and counted; an empty result is an error before training.
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


def load_sources(config: TrainConfig) -> tuple[list[dict], list[dict] | None, str, str | None]:
    """(train records, held-out records or None, their source names) as the config asks.

    Held-out data: ``eval_dataset`` (split ``eval_dataset_split``, default train), else split
    ``eval_dataset_split`` of ``dataset`` (with ``dataset_config``), else None (``eval_split`` is held out).
    ``column_mapping`` applies to the user's sources only, never to the bundled sample (already in
    lorakit's columns): with no ``dataset`` but an ``eval_dataset``, it renames the held-out data alone.
    """
    mapping = config.column_mapping
    if config.dataset is None:
        train_path, eval_path = sample_dataset()
        train_source, eval_source = str(train_path), config.eval_dataset or str(eval_path)
        train = load_records(train_source)
    else:
        train_source, eval_source = config.dataset, config.eval_dataset
        train = load_records(
            train_source, config.dataset_split, config=config.dataset_config, column_mapping=mapping
        )
    if eval_source is not None:
        eval_mapping = mapping if config.eval_dataset is not None else None
        held = load_records(eval_source, config.eval_dataset_split, column_mapping=eval_mapping)
    elif config.eval_dataset_split:
        eval_source = f"{train_source} (split {config.eval_dataset_split})"
        held = load_records(
            train_source, config.eval_dataset_split, config=config.dataset_config, column_mapping=mapping
        )
    else:
        held = None
    return train, held, train_source, eval_source


def prepare_data(config: TrainConfig, tokenizer: Any, say: Callable[[str], None] = print) -> PreparedData:
    """Load, split, tokenize (and optionally pack) the run's data, reporting truncation counts."""
    train_records, eval_records, train_source, eval_source = load_sources(config)
    if eval_records is None:
        train_records, eval_records = split_records(train_records, config.eval_split, config.seed)
    train, train_stats = _tokenize(train_records, tokenizer, config, train_source)
    # Held out by eval_split: the records come from the training file and keep their own line numbers.
    evaluation, eval_stats = (
        _tokenize(eval_records, tokenizer, config, eval_source or train_source) if eval_records else ([], {})
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
