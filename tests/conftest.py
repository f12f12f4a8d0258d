"""Shared fixtures: tiny random transformers models (no download) and a seeded torch."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    config = LlamaConfig(**(settings | overrides))
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


@pytest.fixture
def input_ids():
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, 128, (2, 12), generator=generator)


def compile_backend() -> str:
    """torch.compile's default backend (inductor) needs a C++ compiler on CPU; without one, aot_eager.

    aot_eager still traces the model with dynamo and runs it through AOTAutograd, which is what the compile
    tests check (no graph break, same numbers); inductor only adds generated kernels on top.
    """
    import shutil

    return "inductor" if any(shutil.which(c) for c in ("g++", "c++", "clang++")) else "aot_eager"
