"""The error for bad training data, and the record type that remembers where it was read."""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad or unusable data; the message names the file and line (or row/record) where there is one."""


class Record(dict):
    """A dataset row (a plain ``dict`` to every consumer) that remembers where it came from.

    ``where`` is a human location such as ``"line 12"`` (JSONL, CSV) or ``"row 5"`` (Parquet), used in
    error messages raised after loading (formatting, tokenization).
    """

    __slots__ = ("where",)

    def __init__(self, data: dict, where: str = "") -> None:
        super().__init__(data)
        self.where = where


def location(source: str, record: dict, index: int) -> str:
    """``"<source>, line 12"`` for a :class:`Record`, ``"<source>, record 13"`` (1-based) otherwise."""
    where = getattr(record, "where", "") or f"record {index + 1}"
    return f"{source}, {where}" if source else where
