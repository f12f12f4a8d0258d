"""Malformed data files are errors naming the file and the line, never rows merged or filled in silently."""

from __future__ import annotations

import json

import pytest

from lorakit.data import DatasetError, load_records


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


# ---------------------------------------------------------------------------------------------------- CSV
def test_csv_unterminated_quote_names_the_line_where_it_opened(tmp_path):
    # A lenient reader merges lines 3-5 into one cell of one row and exits 0.
    path = _write(tmp_path / "d.csv", b'instruction,output\nfirst,1\n"second,2\nthird,3\nfourth,4\n')
    with pytest.raises(DatasetError, match=r"d\.csv, line 3: a quote opened in this row is never closed"):
        load_records(path)


def test_csv_stray_quote_after_a_quoted_cell_names_its_row(tmp_path):
    path = _write(tmp_path / "d.csv", b'instruction,output\n"a\nb"c,1\n')
    with pytest.raises(
        DatasetError, match=r"d\.csv, line 3: malformed CSV .*row and its quote start on line 2"
    ):
        load_records(path)


def test_csv_row_with_too_few_cells_names_its_line(tmp_path):
    path = _write(tmp_path / "d.csv", b"instruction,input,output\na,b,c\nonly two,cells\n")
    with pytest.raises(
        DatasetError, match=r"d\.csv, line 3: 2 cells but the header has 3 columns \(write empty"
    ):
        load_records(path)


def test_csv_empty_cells_and_quoted_multiline_cells_still_read(tmp_path):
    path = _write(tmp_path / "d.csv", b'instruction,input,output\na,,c\n"multi\nline, with comma",x,y\n\n')
    records = load_records(path)
    assert records == [
        {"instruction": "a", "input": "", "output": "c"},
        {"instruction": "multi\nline, with comma", "input": "x", "output": "y"},
    ]
    assert [r.where for r in records] == ["line 2", "line 3"]


# ------------------------------------------------------------------------------------------- not UTF-8
@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_non_utf8_text_names_the_line(tmp_path, suffix):
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    latin1 = json.dumps({"instruction": "caf\u00e9", "output": "b"}, ensure_ascii=False).encode("latin-1")
    body = {
        ".jsonl": good + b"\n" + good + b"\n" + latin1 + b"\n",
        ".csv": b"instruction,output\na,b\nc,d\ncaf\xe9,e\n",
        ".json": b"[\n" + good + b",\n" + good + b",\n" + latin1 + b"\n]\n",
    }[suffix]
    line = {".jsonl": 3, ".csv": 4, ".json": 4}[suffix]
    path = _write(tmp_path / f"d{suffix}", body)
    with pytest.raises(
        DatasetError, match=rf"d\{suffix}, line {line}: not UTF-8 text \(byte 0xe9 at byte \d+"
    ):
        load_records(path)


def test_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,instruction,output\na,b,c\n")
    with pytest.raises(
        DatasetError, match=r"line 1: the header names column\(s\) \['instruction'\] more than once"
    ):
        load_records(path)
