"""Records -> token ids and labels, with the loss restricted to the answer tokens.

Each example is a pair of equal-length lists ``input_ids`` and ``labels``. ``labels[t] = input_ids[t]`` where
token ``t`` is a target and ``-100`` (ignored by the cross-entropy) elsewhere; the training loss is the mean
over targets ``t >= 1`` of ``-log p(x_t | x_<t)`` (causal shift: position 0 has no context and never counts).
By default only the answer tokens are targets (supervised fine-tuning, as in InstructGPT, Ouyang et al. 2022,
sec. 3.5); ``train_on_prompt`` makes every token a target. Plain ``text`` rows train on all tokens.

Each (text, is_target) segment from :mod:`lorakit.data.render` is tokenized on its own, without special tokens,
and the pieces are concatenated: the answer boundary is then exact, and the prompt tokens are the ones
generation sees when it tokenizes the same rendered prompt. A BOS token is prepended when the tokenizer adds
one and the rendered text does not already start with it. Sequences longer than ``max_length`` are cut at
``max_length`` and counted in ``stats["num_truncated"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.data.errors import DatasetError, location
from lorakit.data.formats import FORMATS, record_to_example, resolve_format
from lorakit.data.render import Segment, chat_segments

IGNORE_INDEX = -100


@dataclass
class TokenizedDataset:
    """``examples``: dicts of ``input_ids`` and ``labels`` (lists of int); ``stats``: counts (see below).

    stats: ``num_examples``, ``num_truncated`` (cut at max_length), ``num_trainable_tokens`` (targets after the
    causal shift, i.e. ``labels[1:] != -100``), ``num_tokens``, ``num_without_target`` (examples left with no
    target, e.g. a prompt longer than max_length), ``format``.
    """

    examples: list[dict[str, list[int]]]
    stats: dict[str, Any] = field(default_factory=dict)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def added_bos_id(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends one when asked for special tokens, else None."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    adds = bool(with_special) and with_special[0] == bos_id and _ids(tokenizer, "a")[:1] != [bos_id]
    return bos_id if adds else None


def _bos_prefix(tokenizer: Any, text: str, bos_id: int | None) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    return [] if bos_id is None or (bos and text.startswith(bos)) else [bos_id]


def tokenize_segments(
    tokenizer: Any,
    segments: list[Segment],
    *,
    train_on_prompt: bool = False,
    bos_id: int | None | str = "auto",
) -> dict[str, list[int]]:
    """Token ids of the concatenated segments; labels are the ids on target segments and -100 elsewhere.

    ``bos_id``: ``"auto"`` asks the tokenizer (:func:`added_bos_id`); pass it precomputed for speed.
    """
    bos_id = added_bos_id(tokenizer) if bos_id == "auto" else bos_id
    prefix = _bos_prefix(tokenizer, segments[0][0] if segments else "", bos_id)
    input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    for text, is_target in segments:
        ids = _ids(tokenizer, text)
        input_ids += ids
        labels += ids if (is_target or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def tokenize_text(tokenizer: Any, text: str, *, bos_id: int | None | str = "auto") -> dict[str, list[int]]:
    """Continued pre-training: [BOS] + text + [EOS], every token a target."""
    bos_id = added_bos_id(tokenizer) if bos_id == "auto" else bos_id
    ids = _bos_prefix(tokenizer, text, bos_id) + _ids(tokenizer, text)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is not None:
        ids.append(eos_id)
    return {"input_ids": ids, "labels": list(ids)}


def count_targets(labels: list[int]) -> int:
    """Targets that carry a loss after the causal shift: ``labels[1:]`` not equal to -100."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def tokenize_records(
    records: list[dict],
    tokenizer: Any,
    *,
    fmt: str = "auto",
    max_length: int = 1024,
    train_on_prompt: bool = False,
    source: str = "",
) -> TokenizedDataset:
    """Tokenize every record (see module docstring); raises :class:`DatasetError` on unusable data.

    Errors: an empty dataset; a record of the wrong shape (naming ``source`` and its line); no target token
    at all after truncation and masking.
    """
    name = source or "the dataset"
    if max_length < 2:
        raise DatasetError(f"max_length must be at least 2 tokens, got {max_length}.")
    if not records:
        raise DatasetError(f"{name}: the dataset is empty (no records); check the file or the split.")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetError(
                f"{name}, record {index + 1}: expected an object, got {type(record).__name__}."
            )
    if fmt not in FORMATS:
        raise DatasetError(f"Unknown dataset format {fmt!r}; use one of: {', '.join(FORMATS)}.")
    bos_id = added_bos_id(tokenizer)
    examples, truncated, formats = [], 0, set()
    for index, record in enumerate(records):
        where = location(source, record, index)
        record_format = resolve_format(record, fmt, where)
        formats.add(record_format)
        content = record_to_example(record, record_format, where)
        if isinstance(content, str):
            example = tokenize_text(tokenizer, content, bos_id=bos_id)
        else:
            segments = chat_segments(tokenizer, content, where)
            example = tokenize_segments(tokenizer, segments, train_on_prompt=train_on_prompt, bos_id=bos_id)
        if len(example["input_ids"]) > max_length:
            truncated += 1
            example = {key: values[:max_length] for key, values in example.items()}
        examples.append(example)
    targets = [count_targets(e["labels"]) for e in examples]
    stats = {
        "format": formats.pop() if len(formats) == 1 else "mixed",
        "num_examples": len(examples),
        "num_truncated": truncated,
        "num_tokens": sum(len(e["input_ids"]) for e in examples),
        "num_trainable_tokens": sum(targets),
        "num_without_target": sum(1 for t in targets if t == 0),
    }
    if stats["num_trainable_tokens"] == 0:
        raise DatasetError(
            f"{name}: no token is left to train on after masking and truncation to max_length={max_length} "
            f"({truncated} of {len(examples)} examples truncated). Raise max_length, check that the answers "
            "are not empty, or set train_on_prompt: true."
        )
    return TokenizedDataset(examples, stats)
