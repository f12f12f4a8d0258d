"""The real embedded model: GGUF -> safetensors cache, identical logits, fast cached loads, sane generation."""

from __future__ import annotations

import json

import torch

from lorakit.data import render_chat
from lorakit.models import gguf_cache, load_model, load_tokenizer
from lorakit.models.embedded import EMBEDDED_CACHE_NAME
from lorakit.models.gguf_cache import MARKER_NAME
from tests.models.real_smollm2 import converted


def test_conversion_writes_a_complete_safetensors_cache():
    root, _, _ = converted()
    folder = root / "models" / EMBEDDED_CACHE_NAME
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER_NAME} <= names
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    assert [p.name for p in (root / "models").iterdir()] == [EMBEDDED_CACHE_NAME]  # no partial folder left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain float model, not a GGUF-quantized one
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("llama", 576, 30)


def test_cached_model_has_the_logits_of_the_gguf_model_and_never_reads_the_gguf(monkeypatch):
    root, gguf_model, _ = converted()

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached load must not read the GGUF")

    monkeypatch.setattr(gguf_cache, "load_gguf", no_conversion)
    cached = load_model(None, cache_dir=root)
    assert cached.dtype == torch.float32 and not cached.training
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11, 2]])
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)


def test_cached_tokenizer_matches_the_gguf_tokenizer_and_has_chatml():
    root, _, gguf_tokenizer = converted()
    tokenizer = load_tokenizer("smollm2", cache_dir=root)
    text = "Arr! Th' capital o' France be Paris, matey! 12345 <|im_end|>\n"
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_generation_answers_sensibly():
    root, _, _ = converted()
    tokenizer = load_tokenizer(None, cache_dir=root)
    model = load_model(None, cache_dir=root)
    prompt = render_chat(
        tokenizer, [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
