"""Loading from a local folder and from a .gguf file (through the safetensors cache), 4-bit loading."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lorakit.models import ModelLoadError, gguf_cache, load_model, load_tokenizer
from lorakit.models.gguf_cache import MARKER_NAME, convert_gguf, gguf_fingerprint
from tests.data.helpers import char_tokenizer
from tests.models.gguf_builder import tiny_llama, write_tiny_gguf

TOKENS = torch.tensor([[1, 5, 9, 200, 33, 2, 7, 120]])


@pytest.fixture
def tiny_folder(tmp_path):
    model = tiny_llama(seed=3)
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder, model


@pytest.fixture
def tiny_gguf(tmp_path):
    model = tiny_llama(seed=5)
    return write_tiny_gguf(tmp_path / "tiny.gguf", model), model


def _logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(ids).logits


def test_local_folder_loads_same_weights_in_requested_dtype(tiny_folder):
    folder, reference = tiny_folder
    model = load_model(str(folder))
    assert not model.training
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)
    half = load_model(str(folder), dtype=torch.bfloat16, device="cpu")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    assert load_tokenizer(str(folder)).chat_template == char_tokenizer().chat_template


def test_pickle_checkpoint_is_never_loaded(tmp_path, monkeypatch):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load was called on an untrusted checkpoint")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))


def test_gguf_file_is_converted_once_and_matches_the_model_it_was_written_from(
    tiny_gguf, tmp_path, monkeypatch
):
    path, reference = tiny_gguf
    cache = tmp_path / "cache"
    model = load_model(str(path), cache_dir=cache)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-6, atol=1e-6)
    folder = cache / "models" / f"tiny-{gguf_fingerprint(path)[:12]}"
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["gguf_fingerprint"] == gguf_fingerprint(path) and marker["source"] == str(path.resolve())
    assert (folder / "model.safetensors").is_file()
    assert sorted(p.name for p in (cache / "models").iterdir()) == [folder.name]  # no partial folders left

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached folder should have been used")

    monkeypatch.setattr(gguf_cache, "load_gguf", no_conversion)
    again = load_model(str(path), cache_dir=cache)
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=0)
    tokenizer = load_tokenizer(str(path), cache_dir=cache)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


def test_changed_gguf_is_converted_again(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    target = tmp_path / "cache" / "one"
    gguf_cache.ensure_converted(path, target)
    first = json.loads((target / MARKER_NAME).read_text())
    other = tiny_llama(seed=9)
    write_tiny_gguf(path, other)  # same place, new content
    gguf_cache.ensure_converted(path, target)
    second = json.loads((target / MARKER_NAME).read_text())
    assert first["gguf_fingerprint"] != second["gguf_fingerprint"] == gguf_fingerprint(path)
    from transformers import AutoModelForCausalLM

    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(target)), _logits(other), rtol=1e-6, atol=1e-6
    )


def test_interrupted_conversion_leaves_no_cache(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    target = tmp_path / "cache" / "models" / "tiny"

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(gguf_cache.load_gguf(path)[1]), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, target)
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_load_in_4bit_is_load_then_quantize_model(tiny_folder):
    quant = pytest.importorskip("lorakit.quant")
    folder, reference = tiny_folder
    model = load_model(str(folder), load_in_4bit=True, compute_dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, quant.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(layer.compute_dtype == torch.float32 for layer in layers)
    assert type(model.lm_head) is torch.nn.Linear
    expected = _logits(quant.quantize_model(reference, compute_dtype=torch.float32))
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
