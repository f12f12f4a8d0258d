"""Reading dataset files into lists of records (dicts): JSON, JSONL, CSV, Parquet, or through ``datasets``.

Plain ``.jsonl/.json/.csv/.tsv/.parquet`` files are read here, line by line, so errors name the line.
Hub ids, ``datasets`` folders (``save_to_disk`` output or data files), ``.arrow`` files and compressed
files (``.jsonl.gz`` ...) go through the Hugging Face ``datasets`` library (:mod:`lorakit.data.hub`).
Only data formats are read: files that hold pickles (``.bin``, ``.pt``, ``.pkl``, ...) are refused, since
unpickling an untrusted file runs arbitrary code. Every record is a :class:`~lorakit.data.errors.Record`
that knows its line (JSONL, CSV) or row (Parquet, ``datasets``), so later errors can point at it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from lorakit.data.columns import rename_columns
from lorakit.data.errors import DatasetError, Record
from lorakit.data.hub import file_builder, load_with_datasets

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
JSON_SUFFIXES = {".json"}
CSV_SUFFIXES = {".csv", ".tsv"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib"}
SUPPORTED = ".jsonl, .json, .csv, .tsv, .parquet (also .gz/.bz2/.xz-compressed), .arrow or a datasets folder"


def load_records(
    source: str | Path,
    split: str | None = None,
    *,
    config: str | None = None,
    column_mapping: dict[str, str] | None = None,
) -> list[dict]:
    """All records of split ``split`` (default ``train``) of a file, a ``datasets`` folder or a Hub id.

    ``config``: the configuration (subset) of a Hub dataset or folder. ``column_mapping``: columns renamed
    (``{"question": "instruction"}``) before anything else sees the records. A plain file has one split,
    ``train``. Raises :class:`DatasetError` for a malformed line (naming file and line), a row that is not
    an object, an unsupported or pickle file, a missing file, an unknown split (listing the available
    ones) or a mapping that names a missing column (listing the columns). An empty result is returned as
    ``[]``; the tokenizer step reports emptiness, where it knows which role (train/eval) the data has.
    """
    records = _read(source, split, config)
    return rename_columns(records, column_mapping, str(source)) if column_mapping else records


def _read(source: str | Path, split: str | None, config: str | None) -> list[dict]:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise DatasetError(
            f"{source}: refusing to read {suffix} files, which hold pickled Python objects that run code when "
            f"loaded. Convert the data to one of {SUPPORTED}."
        )
    if path.is_dir() or (path.is_file() and file_builder(path) is not None):
        return load_with_datasets(str(source), split, config)
    if not path.is_file():
        if suffix in JSONL_SUFFIXES | JSON_SUFFIXES | CSV_SUFFIXES | PARQUET_SUFFIXES or str(
            source
        ).startswith((".", "/", "~")):
            raise DatasetError(f"Dataset file not found: {source}")
        return load_with_datasets(str(source), split, config)
    readers = {
        **dict.fromkeys(JSONL_SUFFIXES, read_jsonl),
        **dict.fromkeys(JSON_SUFFIXES, read_json),
        **dict.fromkeys(CSV_SUFFIXES, read_csv),
        **dict.fromkeys(PARQUET_SUFFIXES, read_parquet),
    }
    if suffix not in readers:
        raise DatasetError(f"{source}: unsupported file type {suffix or '(none)'}; use one of {SUPPORTED}.")
    if (split or "train") != "train" or config:
        raise DatasetError(
            f"{source} is a single file: its only split is 'train' and it has no configurations (asked for "
            f"split {split or 'train'!r}{f', config {config!r}' if config else ''}). Put held-out data in "
            "eval_dataset."
        )
    return readers[suffix](path)


def _as_record(value: Any, path: Path, where: str) -> Record:
    if not isinstance(value, dict):
        raise DatasetError(
            f'{path}, {where}: expected a JSON object (e.g. {{"instruction": ..., "output": ...}}), '
            f"got {type(value).__name__}."
        )
    return Record(value, where)


def _open_text(path: Path):
    return open(path, encoding="utf-8-sig", newline="")


def not_utf8(path: Path) -> DatasetError:
    """The error for a file that does not decode as UTF-8, naming the first bad line and byte.

    Called after a decode failed, so the file is read a second time only then; lines are counted as the
    readers count them (UTF-8 never has a newline byte inside a multi-byte character).
    """
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return DatasetError(
                    f"{path}, line {number}: not UTF-8 text (byte {line[error.start]:#04x} at byte "
                    f"{error.start + 1} of the line). Save the file as UTF-8, e.g. iconv -f latin1 -t utf-8."
                )
    return DatasetError(f"{path}: not UTF-8 text. Save the file as UTF-8.")


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object per line; blank lines are skipped; a bad line stops with its line number."""
    records = []
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DatasetError(
                        f"{path}, line {number}: invalid JSON ({error.msg} at column {error.colno}). "
                        "Each line of a .jsonl file must be one complete JSON object."
                    ) from None
                records.append(_as_record(value, path, f"line {number}"))
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return records


def read_json(path: Path) -> list[dict]:
    """A JSON array of objects, an object holding one such array (e.g. ``{"data": [...]}``), or JSON lines."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return read_jsonl(path)
        raise DatasetError(
            f"{path}, line {error.lineno}: invalid JSON ({error.msg} at column {error.colno})."
        ) from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            return [_as_record(value, path, "record 1")]
        value = lists[0]
    if not isinstance(value, list):
        raise DatasetError(f"{path}: expected a JSON array of objects, got {type(value).__name__}.")
    return [_as_record(item, path, f"record {i + 1}") for i, item in enumerate(value)]


def read_csv(path: Path) -> list[dict]:
    """A header row, then one record per row (``.tsv``: tab-separated); blank lines are skipped.

    Every row must have as many cells as the header (an empty cell is ``""``, written ``a,,c``). Quoting is
    strict: a quote left open is an error naming the line where it opened, where a lenient reader would
    merge the rest of the file into one cell.
    """
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    records: list[dict] = []
    start = 1  # the line the current row starts on (a quoted cell may span lines)
    try:
        with _open_text(path) as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:  # an empty file
                return []
            _check_header(path, header, delimiter)
            start = reader.line_num + 1
            for row in reader:
                if row:
                    _check_cells(path, row, header, start, delimiter)
                    records.append(Record(dict(zip(header, row)), f"line {start}"))
                start = reader.line_num + 1
    except csv.Error as error:
        raise _csv_error(path, error, start, reader.line_num) from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return records


def _check_header(path: Path, header: list[str], delimiter: str) -> None:
    """A column named twice would keep only one of its cells per row; refuse it."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DatasetError(
            f"{path}, line 1: the header names column(s) {repeated} more than once; give each column its own "
            f"name (separated by {delimiter!r})."
        )


def _check_cells(path: Path, row: list[str], header: list[str], line: int, delimiter: str) -> None:
    if len(row) == len(header):
        return
    hint = (
        f"quote cells that contain '{delimiter}'"
        if len(row) > len(header)
        else f"write empty cells as '{delimiter}{delimiter}'"
    )
    raise DatasetError(
        f"{path}, line {line}: {len(row)} cells but the header has {len(header)} columns ({hint})."
    )


def _csv_error(path: Path, error: csv.Error, start: int, line: int) -> DatasetError:
    if "unexpected end of data" in str(error):
        return DatasetError(
            f"{path}, line {start}: a quote opened in this row is never closed, so every later line would "
            'become part of one cell. Close the quote, and double quotes inside a quoted cell ("").'
        )
    opened = f" (the row and its quote start on line {start})" if start != line else ""
    return DatasetError(
        f"{path}, line {line}: malformed CSV ({error}){opened}. A quoted cell must end right before "
        f'the delimiter or the line end; double quotes inside a quoted cell ("").'
    )


def read_parquet(path: Path) -> list[dict]:
    """Every row of a Parquet file, via pyarrow (nested lists/structs become Python lists/dicts)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises its own ArrowInvalid / OSError types
        raise DatasetError(f"{path}: not a readable Parquet file ({error}).") from None
    return [Record(row, f"row {i + 1}") for i, row in enumerate(rows)]
