"""Prompts from dataset records, text generation, and the before/after comparison of a run.

The before/after generations advance a progress bar by one per generated token (policy:
:func:`lorakit.train.evaluation.show_progress`), since on a CPU they can take minutes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.data import render_chat
from lorakit.train.evaluation import progress_bar

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


class TokenProgress:
    """A ``generate(streamer=...)`` that advances ``bar`` by one per generated token.

    ``generate`` first puts the prompt ids (skipped), then each new token; ``end`` fills the rest of the
    ``budget`` (``max_new_tokens``) so a generation that stops early at EOS still counts in full.
    """

    def __init__(self, bar: Any, budget: int) -> None:
        self.bar, self.budget, self.seen, self.prompt_seen = bar, budget, 0, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        step = min(int(value.numel()), self.budget - self.seen)
        self.seen += step
        self.bar.update(step)

    def end(self) -> None:
        self.bar.update(self.budget - self.seen)
        self.seen = self.budget


def before_after(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[dict[str, str]] | str],
    max_new_tokens: int,
    *,
    progress: bool | None = None,
) -> list[dict[str, str]]:
    """Greedy generations of the base model (adapter disabled) and of the adapted model.

    ``progress``: draw a bar over the generated tokens (None = the stderr/rank-0 policy).
    """
    results = []
    with progress_bar(2 * len(prompts) * max_new_tokens, "samples", progress) as bar:
        for prompt in prompts:
            text = render_prompt(tokenizer, prompt)
            with model.disable_adapter():
                before = generate_text(
                    model,
                    tokenizer,
                    text,
                    max_new_tokens=max_new_tokens,
                    streamer=TokenProgress(bar, max_new_tokens),
                )
            after = generate_text(
                model,
                tokenizer,
                text,
                max_new_tokens=max_new_tokens,
                streamer=TokenProgress(bar, max_new_tokens),
            )
            shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            results.append({"prompt": shown, "before": before.strip(), "after": after.strip()})
    return results


def print_before_after(results: list[dict[str, str]], say: Callable[[str], None] = print) -> None:
    say("\nBefore / after training (greedy decoding, held-out prompts):")
    for number, result in enumerate(results, 1):
        say(f"\n[{number}] prompt: {result['prompt']}")
        say(f"    before: {result['before']}")
        say(f"    after:  {result['after']}")
