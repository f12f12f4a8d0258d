"""A bad record that lands in the automatic held-out split (``eval_split``) is reported with the training file's
name and the record's own line in it, as it would be in the training split."""

from __future__ import annotations

import json

import pytest

from lorakit.data import DatasetError
from lorakit.train.config import load_config
from lorakit.train.data_prep import prepare_data, split_records

from .helpers import char_tokenizer


def test_bad_record_in_the_automatic_eval_split_names_file_and_original_line(tmp_path):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    _, held = split_records(list(range(20)), 0.2, seed=42)  # which rows the run holds out
    bad = held[0]
    del records[bad]["output"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    config = load_config(None, {"dataset": str(path), "eval_split": "0.2", "seed": "42"})

    with pytest.raises(DatasetError) as caught:
        prepare_data(config, char_tokenizer(), say=lambda _: None)
    assert str(caught.value).startswith(f"{path}, line {bad + 1}: missing field 'output'")
