"""Tiny random models, a character tokenizer and small datasets for the trainer tests."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from tests.conftest import tiny_llama as conftest_tiny_llama  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: the specials plus printable ASCII (vocab < 128)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(seed: int = 0, vocab_size: int = 128) -> LlamaForCausalLM:
    """The shared tiny Llama, with longer positions and the character tokenizer's special ids."""
    return conftest_tiny_llama(
        seed,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama + character tokenizer saved as a transformers folder."""
    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama(seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def qa_records(n: int, offset: int = 0) -> list[dict]:
    """Alpaca-style records with a learnable rule: the answer is the question reversed."""
    words = ["apple", "river", "stone", "cloud", "green", "tiger", "lemon", "piano", "mouse", "ocean"]
    records = []
    for i in range(offset, offset + n):
        word = words[i % len(words)] + str(i % 7)
        records.append({"instruction": f"Reverse {word}", "input": "", "output": word[::-1]})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_run_flags(inputs: dict[str, Path], output_dir: Path, **overrides: object) -> dict[str, str]:
    """Config values (as flag strings) for a fast run on the tiny model."""
    flags = {
        "model": str(inputs["model"]),
        "dataset": str(inputs["train"]),
        "eval_dataset": str(inputs["eval"]),
        "output_dir": str(output_dir),
        "lora_r": "4",
        "lora_alpha": "8",
        "learning_rate": "1e-2",
        "micro_batch_size": "2",
        "gradient_accumulation_steps": "2",
        "max_steps": "6",
        "eval_steps": "3",
        "save_steps": "2",
        "max_seq_length": "64",
        "sample_max_new_tokens": "4",
        "device": "cpu",
    }
    flags.update({key: str(value) for key, value in overrides.items()})
    return flags


def adapter_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))
