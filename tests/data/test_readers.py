"""Reading JSONL / JSON / CSV / Parquet files: records, line numbers in errors, pickle files refused."""

from __future__ import annotations

import json
import pickle
import sys

import pytest

from lorakit.data import DatasetError, load_records

ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Greet", "input": "Bob, Alice", "output": 'Hi "Bob"\nand Alice'},
]


def test_jsonl_reads_objects_skips_blank_lines_and_records_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    records = load_records(str(path))
    assert records == ROWS
    assert [r.where for r in records] == ["line 1", "line 3"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + '{"instruction": "x", "output": \n'
    )
    with pytest.raises(DatasetError) as caught:
        load_records(str(path))
    message = str(caught.value)
    assert "broken.jsonl" in message and "line 3" in message and "invalid JSON" in message


def test_jsonl_line_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DatasetError, match=r"d\.jsonl, line 2: expected a JSON object.*got list"):
        load_records(str(path))


def test_json_array_object_with_list_and_json_lines(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS))
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}))
    lines = tmp_path / "l.json"
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    for path in (array, wrapped, lines):
        assert load_records(str(path)) == ROWS
    assert [r.where for r in load_records(str(array))] == ["record 1", "record 2"]


def test_json_syntax_error_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(DatasetError, match=r"bad\.json, line 3: invalid JSON"):
        load_records(str(path))


def test_csv_with_quoted_commas_and_newlines_gives_start_line_of_each_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'instruction,input,output\n"Add 2 and 3.",,5\nGreet,"Bob, Alice","Hi ""Bob""\nand Alice"\n'
    )
    records = load_records(str(path))
    assert records == ROWS
    assert [r.where for r in records] == ["line 2", "line 3"]


def test_csv_row_with_extra_cells_names_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")
    with pytest.raises(DatasetError, match=r"d\.csv, line 3: 3 cells but the header has 2 columns"):
        load_records(str(path))


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("instruction\toutput\nsay hi\thi, there\n")
    assert load_records(str(path)) == [{"instruction": "say hi", "output": "hi, there"}]


def test_parquet_rows_including_nested_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, *[]]
    rows.append({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = load_records(str(path))
    assert records == rows
    assert records[1].where == "row 2"


@pytest.mark.parametrize("suffix", [".bin", ".pkl", ".pt", ".pickle"])
def test_pickle_files_are_refused_without_being_opened(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(pickle.dumps(ROWS))

    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(DatasetError, match="refusing to read"):
        load_records(str(path))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    other = tmp_path / "d.txt"
    other.write_text("hello")
    with pytest.raises(DatasetError, match=r"unsupported file type \.txt"):
        load_records(str(other))


def test_empty_file_gives_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert load_records(str(path)) == []


def test_hub_name_without_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetError, match="pip install datasets"):
        load_records("tatsu-lab/alpaca")


def test_hub_name_uses_datasets_lazily_with_split(monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, split):
            calls.append((name, split))
            return [{"text": "a"}, {"text": "b"}]

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    records = load_records("someone/corpus", split="validation")
    assert records == [{"text": "a"}, {"text": "b"}] and calls == [("someone/corpus", "validation")]
    assert records[1].where == "row 2"
