"""Writing a tiny llama GGUF file (float32 tensors, byte-level BPE vocabulary) from a random transformers model.

It lets the tests check lorakit's .gguf path end to end against the model the file was written from. The
tensor names and the rotary permutation of q/k rows follow llama.cpp's GGUF convention for llama models
(rows of each head reordered from two halves to interleaved pairs), which transformers undoes on load.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tests.conftest import tiny_llama as conftest_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ w"]


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: printable bytes map to themselves, the others to 256 + n."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def vocabulary() -> list[str]:
    return SPECIALS + _byte_symbols() + [merge.replace(" ", "") for merge in MERGES]


def tiny_llama(seed: int = 0):
    """The shared tiny Llama, with this tokenizer's vocabulary and GGUF-friendly settings."""
    return conftest_tiny_llama(
        seed,
        vocab_size=len(vocabulary()),
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )


def _rotary_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, model) -> Path:
    """Write ``model`` (a tiny LlamaForCausalLM from :func:`tiny_llama`) with a ChatML template to ``path``."""
    import gguf

    config = model.config
    tokens = vocabulary()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        q = _rotary_permute(state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads)
        k = _rotary_permute(state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.attn_q.weight", q)
        writer.add_tensor(f"blk.{layer}.attn_k.weight", k)
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", state[prefix + hf_name + ".weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
