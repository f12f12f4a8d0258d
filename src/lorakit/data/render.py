"""Turning chat messages into text, split into prompt and target (answer) segments.

With a chat template (``tokenizer.chat_template``) the text is exactly what ``apply_chat_template`` renders,
so training sees the same format as generation. The answer of assistant turn ``i`` is the span between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``: the answer text and
the template's end-of-turn marker (for ChatML ``<|im_end|>\\n``), so the model learns to stop. Templates that
render earlier turns differently once later turns follow (e.g. ones that drop past reasoning) are not
prefix-consistent; then only the last assistant turn is a target.

Without a chat template, :data:`PLAIN_TEMPLATE` is used: ``### User:\\n...\\n\\n### Assistant:\\n...<eos>\\n\\n``.
"""

from __future__ import annotations

from typing import Any

from lorakit.data.errors import DatasetError

Messages = list[dict[str, str]]
Segment = tuple[str, bool]  # (text, is_target)
PLAIN_ROLE_TITLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_TEMPLATE = "### {title}:\n{content}\n\n"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply_template(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _plain_segments(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> list[Segment]:
    eos = getattr(tokenizer, "eos_token", None) or ""
    segments: list[Segment] = []
    for message in messages:
        title = PLAIN_ROLE_TITLES[message["role"]]
        if message["role"] == "assistant":
            segments.append((f"### {title}:\n", False))
            segments.append((message["content"] + eos, True))
            segments.append(("\n\n", False))
        else:
            segments.append((PLAIN_TEMPLATE.format(title=title, content=message["content"]), False))
    if add_generation_prompt:
        segments.append(("### Assistant:\n", False))
    return segments


def render_chat(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, or the plain template without one.

    Use it with ``add_generation_prompt=True`` to build a prompt for generation in the trained format.
    """
    if has_chat_template(tokenizer):
        return _apply_template(tokenizer, messages, add_generation_prompt)
    return "".join(text for text, _ in _plain_segments(tokenizer, messages, add_generation_prompt))


def _answer_spans(tokenizer: Any, messages: Messages, full: str) -> list[tuple[int, int]] | None:
    """Character spans of every assistant answer in ``full``, or None if the template is not prefix-consistent."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:index], True) if index else ""
        through = _apply_template(tokenizer, messages[: index + 1], False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            return None
        spans.append((len(before), len(through)))
    return spans


def _last_answer_span(tokenizer: Any, messages: Messages, full: str, where: str) -> list[tuple[int, int]]:
    if messages[-1]["role"] == "assistant":
        before = _apply_template(tokenizer, messages[:-1], True)
        if full.startswith(before):
            return [(len(before), len(full))]
    raise DatasetError(
        f"{where}: the tokenizer's chat template does not render the conversation's prompt as a prefix of the "
        "whole conversation, so the answer tokens cannot be located. Set train_on_prompt: true, or use a "
        "tokenizer whose template is prefix-consistent."
    )


def chat_segments(tokenizer: Any, messages: Messages, where: str = "") -> list[Segment]:
    """The rendered conversation as consecutive (text, is_target) pieces; targets are the answers."""
    if not has_chat_template(tokenizer):
        return _plain_segments(tokenizer, messages, False)
    full = _apply_template(tokenizer, messages, False)
    spans = _answer_spans(tokenizer, messages, full)
    if spans is None:
        spans = _last_answer_span(tokenizer, messages, full, where)
    segments: list[Segment] = []
    cursor = 0
    for start, end in spans:
        if start > cursor:
            segments.append((full[cursor:start], False))
        if end > start:
            segments.append((full[start:end], True))
        cursor = max(cursor, end)
    if cursor < len(full):
        segments.append((full[cursor:], False))
    return segments
