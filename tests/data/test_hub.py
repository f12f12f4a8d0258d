"""Data through the `datasets` library: save_to_disk folders, Hub-layout folders, Hub ids (offline, from a
pre-populated cache), Arrow and compressed files; splits, configurations and their errors."""

from __future__ import annotations

import bz2
import gzip
import json
import shutil

import pytest

from lorakit.data import DatasetError, load_records

datasets = pytest.importorskip("datasets")

TRAIN = [{"question": "Say hi", "response": "hi"}, {"question": "Say yo", "response": "yo"}]
TEST = [{"question": "Say ok", "response": "ok"}]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A private datasets cache per test, offline like the rest of the suite."""
    cache = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _hub_layout(folder):
    """A folder laid out like a Hub dataset repository: data/<split>-*.jsonl."""
    _write_jsonl(folder / "data" / "train-00000-of-00001.jsonl", TRAIN)
    _write_jsonl(folder / "data" / "test-00000-of-00001.jsonl", TEST)
    return folder


def _plain(records):
    return [dict(r) for r in records]


# ---------------------------------------------------------------------------------------- save_to_disk
def test_save_to_disk_dataset_dict_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(TRAIN), "test": datasets.Dataset.from_list(TEST)}
    ).save_to_disk(str(folder))
    assert _plain(load_records(str(folder))) == TRAIN
    records = load_records(str(folder), "test")
    assert _plain(records) == TEST and records[0].where == "row 1"
    with pytest.raises(DatasetError, match=r"no split 'validation'; available splits: train, test"):
        load_records(str(folder), "validation")
    with pytest.raises(DatasetError, match="has no configurations"):
        load_records(str(folder), config="easy")


def test_save_to_disk_single_dataset(tmp_path):
    folder = tmp_path / "single"
    datasets.Dataset.from_list(TRAIN).save_to_disk(str(folder))
    assert _plain(load_records(str(folder))) == TRAIN
    with pytest.raises(DatasetError, match="available splits: train"):
        load_records(str(folder), "test")


# ----------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("opener", [gzip.open, bz2.open])
def test_compressed_jsonl_and_csv(tmp_path, opener):
    suffix = ".gz" if opener is gzip.open else ".bz2"
    jsonl = tmp_path / f"d.jsonl{suffix}"
    with opener(jsonl, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in TRAIN))
    assert _plain(load_records(str(jsonl))) == TRAIN
    table = tmp_path / f"d.csv{suffix}"
    with opener(table, "wt", encoding="utf-8") as handle:
        handle.write("question,response\nSay hi,hi\nSay yo,yo\n")
    assert _plain(load_records(str(table))) == TRAIN


def test_arrow_file(tmp_path):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(TRAIN).save_to_disk(str(folder))
    (arrow,) = folder.glob("*.arrow")
    assert _plain(load_records(str(arrow))) == TRAIN


def test_a_single_file_has_only_the_train_split(tmp_path):
    plain = _write_jsonl(tmp_path / "d.jsonl", TRAIN)
    with pytest.raises(DatasetError, match=r"only split is 'train'.*asked for split 'test'"):
        load_records(str(plain), "test")
    with pytest.raises(DatasetError, match=r"no configurations \(asked for split 'train', config 'x'\)"):
        load_records(str(plain), config="x")
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(DatasetError, match="only split is 'train'"):
        load_records(str(packed), "validation")
    assert len(load_records(str(plain), "train")) == 2  # the default split works as before


# --------------------------------------------------------------------------------- Hub-layout folders
def test_folder_laid_out_like_a_hub_repository(tmp_path):
    folder = _hub_layout(tmp_path / "repo")
    assert _plain(load_records(str(folder))) == TRAIN
    assert _plain(load_records(str(folder), "test")) == TEST
    assert len(load_records(str(folder), "train[:1]")) == 1  # datasets' slice syntax
    with pytest.raises(DatasetError, match="no split 'validation'; available splits: train, test"):
        load_records(str(folder), "validation")


def test_configurations_of_a_folder(tmp_path):
    folder = tmp_path / "repo"
    _write_jsonl(folder / "easy" / "train.jsonl", TRAIN)
    _write_jsonl(folder / "hard" / "train.jsonl", TEST)
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - split: train\n    path: easy/train.jsonl\n  default: true\n"
        "- config_name: hard\n  data_files:\n  - split: train\n    path: hard/train.jsonl\n---\n"
    )
    assert _plain(load_records(str(folder))) == TRAIN
    assert _plain(load_records(str(folder), config="hard")) == TEST
    with pytest.raises(DatasetError, match=r"config 'medium'.*medium"):
        load_records(str(folder), config="medium")


# -------------------------------------------------------------------------------------------- Hub ids
@pytest.fixture
def cached_hub_dataset(tmp_path, datasets_cache):
    """``someone/qa`` in the datasets cache, as a first online load leaves it; read back offline."""
    folder = _hub_layout(tmp_path / "qa")
    datasets.load_dataset(str(folder))  # prepares <cache>/qa/default/0.0.0/<hash>
    shutil.copytree(datasets_cache / "qa", datasets_cache / "someone___qa")
    return "someone/qa"


def test_hub_id_with_split_from_the_offline_cache(cached_hub_dataset):
    assert _plain(load_records(cached_hub_dataset)) == TRAIN
    assert _plain(load_records(cached_hub_dataset, "test")) == TEST
    with pytest.raises(
        DatasetError, match=r"someone/qa has no split 'validation'; available splits: train, test"
    ):
        load_records(cached_hub_dataset, "validation")
    with pytest.raises(
        DatasetError, match=r"Could not load the Hugging Face dataset 'someone/qa'.*config 'x'"
    ):
        load_records(cached_hub_dataset, config="x")


def test_unknown_hub_id_offline_is_a_dataset_error():
    with pytest.raises(DatasetError, match="Could not load the Hugging Face dataset 'nobody/nothing'"):
        load_records("nobody/nothing")


# ------------------------------------------------------------------------------------------ columns
def test_column_mapping_works_for_every_source(tmp_path, cached_hub_dataset):
    mapping = {"question": "instruction", "response": "output"}
    expected = [{"instruction": r["question"], "output": r["response"]} for r in TRAIN]
    plain = _write_jsonl(tmp_path / "d.jsonl", TRAIN)
    for source in (str(plain), str(_hub_layout(tmp_path / "repo")), cached_hub_dataset):
        records = load_records(source, column_mapping=mapping)
        assert _plain(records) == expected, source
    assert [r.where for r in load_records(str(plain), column_mapping=mapping)] == ["line 1", "line 2"]
