"""Every row format becomes the right chat messages (or text); malformed rows name their line."""

from __future__ import annotations

import json

import pytest

from lorakit.data import DatasetError, load_records, record_to_example, tokenize_records
from lorakit.data.formats import detect_format
from tests.data.helpers import char_tokenizer


def test_alpaca_with_input_and_system():
    record = {"system": "Be brief.", "instruction": "Sum these.", "input": "2, 3", "output": "5"}
    assert record_to_example(record, "alpaca", "x") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum these.\n\n2, 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_alpaca_without_input_and_numeric_output_and_none_input():
    record = {"instruction": "2+3?", "input": None, "output": 5}
    assert record_to_example(record, "alpaca", "x") == [
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
    ]


def test_openai_messages_and_sharegpt_conversations_give_the_same_messages():
    messages = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2"},
        ]
    }
    sharegpt = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    assert record_to_example(sharegpt, "sharegpt", "x") == record_to_example(messages, "messages", "x")
    assert record_to_example(messages, "messages", "x") == messages["messages"]


def test_text_rows():
    assert record_to_example({"text": "Once upon a time."}, "text", "x") == "Once upon a time."


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"instruction": "i", "output": "o"}, "alpaca"),
        ({"messages": []}, "messages"),
        ({"conversations": []}, "sharegpt"),
        ({"text": "t"}, "text"),
        ({"question": "q"}, None),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_auto_format_detects_each_row_and_names_the_line_of_an_unknown_one(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "plain"}, {"instruction": "i", "output": "o"}, {"question": "q", "answer": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(str(path))
    assert tokenize_records(records[:2], char_tokenizer()).stats["format"] == "mixed"
    with pytest.raises(
        DatasetError, match=r"d\.jsonl, line 3: cannot tell the dataset format.*\['answer', 'question'\]"
    ):
        tokenize_records(records, char_tokenizer(), source=str(path))
    with pytest.raises(DatasetError, match="Unknown dataset format 'xml'"):
        tokenize_records(records, char_tokenizer(), fmt="xml")
    with pytest.raises(DatasetError, match="line 1: missing field 'instruction'"):
        tokenize_records(records, char_tokenizer(), fmt="alpaca", source=str(path))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "i"}, "missing field 'output'"),
        ({"instruction": ["i"], "output": "o"}, "field 'instruction' must be text, got list"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"messages": [{"role": "pirate", "content": "q"}]}, "unknown role 'pirate'"),
        (
            {"messages": [{"role": "user"}]},
            "turn 1 of 'messages' must be an object with 'role' and 'content'",
        ),
        ({"messages": "hello"}, "'messages' must be a non-empty list"),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
            "turn 2 'value' must be text",
        ),
    ],
)
def test_malformed_rows_name_file_line_and_problem(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    good = (
        row
        if "instruction" in row
        else {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    if "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    if "instruction" in row:
        good = {"instruction": "i", "output": "o"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DatasetError) as caught:
        tokenize_records(load_records(str(path)), char_tokenizer(), source=str(path))
    assert f"{path}, line 2: " in str(caught.value) and message in str(caught.value)
