"""Prompts from dataset records, text generation, and the before/after comparison of a run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.data import render_chat

USER_ROLES = {"user", "human"}
ROLE_NAMES = {"human": "user", "gpt": "assistant", "bot": "assistant", "system": "system", "user": "user"}


def record_prompt(record: dict[str, Any]) -> list[dict[str, str]] | str:
    """The prompt part of a record: chat messages up to the last user turn, or the first half of a text."""
    if "instruction" in record:
        text = str(record["instruction"])
        if record.get("input"):
            text += "\n\n" + str(record["input"])
        return [{"role": "user", "content": text}]
    turns = record.get("messages") or record.get("conversations")
    if isinstance(turns, list) and turns:
        messages = [
            {
                "role": ROLE_NAMES.get(str(t.get("role", t.get("from"))), str(t.get("role", t.get("from")))),
                "content": str(t.get("content", t.get("value", ""))),
            }
            for t in turns
        ]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
        return messages[: last_user + 1]
    if "prompt" in record:
        return [{"role": "user", "content": str(record["prompt"])}]
    text = str(record.get("text", ""))
    return text[: max(1, len(text) // 2)]


def render_prompt(tokenizer: Any, prompt: list[dict[str, str]] | str) -> str:
    """Chat messages through the tokenizer's chat template (a plain string as is)."""
    if isinstance(prompt, str):
        return prompt
    return render_chat(tokenizer, prompt, add_generation_prompt=True)  # the same format training used


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt_text: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    streamer: Any = None,
) -> str:
    """Continue ``prompt_text``; ``temperature`` 0 = greedy. Returns only the new text."""
    device = next(model.parameters()).device
    encoded = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False).to(device)
    sampling = temperature > 0
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=sampling, streamer=streamer, use_cache=True
    )
    if sampling:
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = repetition_penalty
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    output = model.generate(**encoded, pad_token_id=pad_id, **options)
    model.train(was_training)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def before_after(
    model: nn.Module, tokenizer: Any, prompts: list[list[dict[str, str]] | str], max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy generations of the base model (adapter disabled) and of the adapted model."""
    results = []
    for prompt in prompts:
        text = render_prompt(tokenizer, prompt)
        with model.disable_adapter():
            before = generate_text(model, tokenizer, text, max_new_tokens=max_new_tokens)
        after = generate_text(model, tokenizer, text, max_new_tokens=max_new_tokens)
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        results.append({"prompt": shown, "before": before.strip(), "after": after.strip()})
    return results


def print_before_after(results: list[dict[str, str]], say: Callable[[str], None] = print) -> None:
    say("\nBefore / after training (greedy decoding, held-out prompts):")
    for number, result in enumerate(results, 1):
        say(f"\n[{number}] prompt: {result['prompt']}")
        say(f"    before: {result['before']}")
        say(f"    after:  {result['after']}")
