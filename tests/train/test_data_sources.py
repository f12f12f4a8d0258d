"""The data keys of a run: dataset_split / dataset_config / eval_dataset_split / column_mapping."""

from __future__ import annotations

import json

import pytest

from lorakit.data import DatasetError
from lorakit.train.config import ConfigError, config_to_yaml, load_config
from lorakit.train.data_prep import load_sources
from lorakit.train.loop import train
from lorakit.train.metrics import read_metrics

from .helpers import qa_records, tiny_run_flags

datasets = pytest.importorskip("datasets")

MAPPING = {"question": "instruction", "response": "output"}


def _renamed(records: list[dict]) -> list[dict]:
    return [{"question": r["instruction"], "response": r["output"]} for r in records]


@pytest.fixture
def saved_dataset(tmp_path):
    """A save_to_disk DatasetDict whose columns are not lorakit's: question / response."""
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_renamed(qa_records(16))),
            "validation": datasets.Dataset.from_list(_renamed(qa_records(4, offset=100))),
        }
    ).save_to_disk(str(folder))
    return folder


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "value",
    [
        MAPPING,  # YAML mapping
        ["question=instruction", "response=output"],  # space-separated flag values
        "question=instruction,response=output",
        "question:instruction, response:output",
        '{"question": "instruction", "response": "output"}',
    ],
)
def test_column_mapping_spellings(value) -> None:
    assert load_config(None, {"column_mapping": value}).column_mapping == MAPPING


def test_column_mapping_in_yaml_is_a_value_not_nesting(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "column_mapping:\n  question: instruction\n  response: output\ndataset_split: train[:8]\n"
    )
    config = load_config(path)
    assert config.column_mapping == MAPPING and config.dataset_split == "train[:8]"
    path.write_text(config_to_yaml(config))
    assert load_config(path) == config


def test_bad_data_keys_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'column_mapping' must map column names"):
        load_config(None, {"column_mapping": "question"})
    with pytest.raises(ConfigError, match="'eval_dataset_split' needs a dataset"):
        load_config(None, {"eval_dataset_split": "validation"})


# --------------------------------------------------------------------------------------------- sources
def test_train_and_held_out_splits_of_one_dataset(saved_dataset) -> None:
    config = load_config(
        None, {"dataset": str(saved_dataset), "eval_dataset_split": "validation", "column_mapping": MAPPING}
    )
    train_records, held, _, eval_source = load_sources(config)
    assert [dict(r) for r in train_records] == [
        {"instruction": r["instruction"], "output": r["output"]} for r in qa_records(16)
    ]
    assert len(held) == 4 and set(held[0]) == {"instruction", "output"}
    assert eval_source.endswith("(split validation)")


def test_without_eval_split_the_fraction_is_held_out(saved_dataset) -> None:
    config = load_config(None, {"dataset": str(saved_dataset), "column_mapping": MAPPING})
    assert load_sources(config)[1] is None  # prepare_data then holds out eval_split


def test_column_mapping_renames_the_users_eval_dataset_not_the_bundled_sample(saved_dataset) -> None:
    """No dataset: training uses the bundled sample as it is; the mapping renames eval_dataset only."""
    config = load_config(
        None,
        {"eval_dataset": str(saved_dataset), "eval_dataset_split": "validation", "column_mapping": MAPPING},
    )
    train_records, held, train_source, eval_source = load_sources(config)
    assert train_source.endswith("train.jsonl") and train_records and "instruction" in train_records[0]
    assert eval_source == str(saved_dataset)
    assert [dict(r) for r in held] == [
        {"instruction": r["instruction"], "output": r["output"]} for r in qa_records(4, offset=100)
    ]


def test_source_errors_name_splits_and_columns(saved_dataset) -> None:
    config = load_config(None, {"dataset": str(saved_dataset), "dataset_split": "test"})
    with pytest.raises(DatasetError, match="available splits: train, validation"):
        load_sources(config)
    config = load_config(None, {"dataset": str(saved_dataset), "column_mapping": {"prompt": "instruction"}})
    with pytest.raises(
        DatasetError,
        match=r"names 'prompt', which the data does not have; its columns are: question, response",
    ):
        load_sources(config)
    config = load_config(None, {"dataset": str(saved_dataset), "column_mapping": {"question": "response"}})
    with pytest.raises(DatasetError, match="renames a column to 'response', which the data already has"):
        load_sources(config)


def test_a_run_on_a_saved_dataset_with_mapped_columns(tiny_run_inputs, saved_dataset, tmp_path) -> None:
    flags = tiny_run_flags(
        tiny_run_inputs,
        tmp_path / "run",
        dataset=str(saved_dataset),
        eval_dataset="none",
        eval_dataset_split="validation",
        column_mapping="question=instruction,response=output",
        max_steps=2,
        sample_max_new_tokens=0,
    )
    result = train(load_config(None, flags))
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and result.summary["steps"] == 2
    assert (
        json.loads((tmp_path / "run" / "summary.json").read_text())["eval_loss_end"] == evals[-1]["eval_loss"]
    )
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.column_mapping == MAPPING and saved.eval_dataset_split == "validation"
