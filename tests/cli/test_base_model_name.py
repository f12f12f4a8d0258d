"""Adapters name their base model portably: the Hub id for the embedded model, absolute paths for folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.models import load_model, resolve_source
from lorakit.models import loading as loading_module
from lorakit.models.embedded import EMBEDDED_HUB_ID
from lorakit.models.loading import ModelSource, recorded_name

from ..train.helpers import qa_records, save_tiny_model, write_jsonl


def _save_adapter(model, folder: Path) -> str:
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(folder)
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_relative_folder_is_recorded_as_an_absolute_path(tmp_path, monkeypatch, capsys) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    save_tiny_model(work / "tiny")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    model = load_model("tiny")
    assert model.config.name_or_path == str((work / "tiny").resolve())
    assert _save_adapter(model, work / "adapter") == str((work / "tiny").resolve())
    # The adapter now works from any directory: its base is found without --model.
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(3))
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--adapter", str(work / "adapter"), "--dataset", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["examples"] == 3


def test_embedded_model_is_recorded_as_its_hub_id(tmp_path, monkeypatch) -> None:
    assert recorded_name(resolve_source(None)) == EMBEDDED_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # Stand in a tiny folder for the converted cache so no real weights are needed.
    tiny = save_tiny_model(tmp_path / "cache-stand-in")
    monkeypatch.setattr(loading_module, "_source_folder", lambda source, cache_dir: str(tiny))
    model = load_model(None)
    assert model.config.name_or_path == EMBEDDED_HUB_ID
    assert _save_adapter(model, tmp_path / "adapter") == EMBEDDED_HUB_ID


@pytest.mark.parametrize("name", [EMBEDDED_HUB_ID, EMBEDDED_HUB_ID.lower()])
def test_the_recorded_hub_id_loads_the_embedded_model_again(name: str) -> None:
    assert resolve_source(name).kind == "embedded"  # offline round trip: adapter -> base -> embedded GGUF


def test_gguf_and_hub_sources_are_recorded_portably(tmp_path) -> None:
    gguf = tmp_path / "m.gguf"
    assert recorded_name(ModelSource("gguf", "m.gguf", gguf.resolve())) == str(gguf.resolve())
    assert recorded_name(ModelSource("hub", "someone/some-model")) == "someone/some-model"
