"""``column_mapping``: rename a dataset's columns to the names lorakit's formats read.

``{"question": "instruction", "response": "output"}`` turns rows ``{question, response}`` into alpaca
rows ``{instruction, output}`` before the format is detected. Renaming happens once, right after reading,
so every later error still points at the row's file and line (:class:`~lorakit.data.errors.Record`).
"""

from __future__ import annotations

from collections import Counter

from lorakit.data.errors import DatasetError, Record


def column_names(records: list[dict]) -> list[str]:
    """Every key that occurs in ``records``, in first-seen order."""
    return list(dict.fromkeys(key for record in records for key in record))


def rename_columns(records: list[dict], mapping: dict[str, str], source: str) -> list[dict]:
    """``records`` with the keys of ``mapping`` renamed to its values (other columns kept).

    Raises :class:`DatasetError` naming the data's columns when a mapped column occurs in no row, when two
    columns would get the same name, or when a new name is already a column that is not renamed itself.
    """
    if not mapping or not records:
        return records
    columns = column_names(records)
    available = f"its columns are: {', '.join(columns)}"
    missing = [name for name in mapping if name not in columns]
    if missing:
        raise DatasetError(
            f"{source}: column_mapping names {', '.join(repr(m) for m in missing)}, which the data does not "
            f"have; {available}."
        )
    doubled = [name for name, count in Counter(mapping.values()).items() if count > 1]
    if doubled:
        raise DatasetError(f"{source}: column_mapping maps several columns onto {doubled[0]!r}.")
    clashes = [new for new in mapping.values() if new in columns and new not in mapping]
    if clashes:
        raise DatasetError(
            f"{source}: column_mapping renames a column to {clashes[0]!r}, which the data already has; "
            f"map that column to another name too, or choose another target ({available})."
        )
    return [
        Record({mapping.get(key, key): value for key, value in record.items()}, getattr(record, "where", ""))
        for record in records
    ]
