"""Dataset row formats, each turned into one common form: chat messages, or plain text.

- ``alpaca``: ``instruction``, optional ``input``, ``output``, optional ``system``
  -> [system], user = instruction (+ blank line + input), assistant = output.
- ``messages`` (OpenAI): ``messages = [{"role": "system"|"user"|"assistant", "content": str}, ...]``.
- ``sharegpt``: ``conversations = [{"from": "system"|"human"|"gpt", "value": str}, ...]``
  (``user``/``assistant``/``bot``/``chatgpt`` are accepted as role names too).
- ``text``: ``text`` for continued pre-training (every token is a target).
"""

from __future__ import annotations

from typing import Any

from lorakit.data.errors import DatasetError

FORMATS = ("auto", "alpaca", "messages", "sharegpt", "text")
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
Messages = list[dict[str, str]]


def detect_format(record: dict) -> str | None:
    """The format whose key fields the record has, or None."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def resolve_format(record: dict, fmt: str, where: str = "") -> str:
    """``fmt``, or for ``auto`` the format this record's fields show (each record is detected on its own)."""
    if fmt not in FORMATS:
        raise DatasetError(f"Unknown dataset format {fmt!r}; use one of: {', '.join(FORMATS)}.")
    if fmt != "auto":
        return fmt
    detected = detect_format(record)
    if detected is None:
        raise DatasetError(
            f"{where}: cannot tell the dataset format from the fields {sorted(record)}. Expected "
            "instruction/output (alpaca), messages, conversations (ShareGPT) or text; or set the format explicitly."
        )
    return detected


def _text_field(record: dict, key: str, where: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DatasetError(f"{where}: missing field {key!r}.")
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {key!r} must be text, got {type(value).__name__}.")
    return value


def alpaca_messages(record: dict, where: str) -> Messages:
    """[system,] user = instruction (+ ``\\n\\n`` + input), assistant = output."""
    instruction = _text_field(record, "instruction", where, required=True)
    extra = _text_field(record, "input", where, required=False)
    output = _text_field(record, "output", where, required=True)
    system = _text_field(record, "system", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chat_messages(turns: Any, where: str, *, role_key: str, content_key: str, field: str) -> Messages:
    """Validate a list of turns and map its role names to system/user/assistant."""
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: {field!r} must be a non-empty list of turns.")
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DatasetError(
                f"{where}: turn {number} of {field!r} must be an object with {role_key!r} and {content_key!r}."
            )
        role = ROLE_ALIASES.get(str(turn[role_key]).strip().lower())
        if role is None:
            raise DatasetError(
                f"{where}: turn {number} has unknown role {turn[role_key]!r}; "
                f"use one of {sorted(ROLE_ALIASES)}."
            )
        content = turn[content_key]
        if not isinstance(content, str):
            raise DatasetError(
                f"{where}: turn {number} {content_key!r} must be text, got {type(content).__name__}."
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant turn, so nothing to learn from.")
    return messages


def record_to_example(record: dict, fmt: str, where: str) -> Messages | str:
    """Chat messages (alpaca, messages, sharegpt) or a plain string (text) for one record."""
    if fmt == "alpaca":
        return alpaca_messages(record, where)
    if fmt == "messages":
        return chat_messages(
            record.get("messages"), where, role_key="role", content_key="content", field="messages"
        )
    if fmt == "sharegpt":
        return chat_messages(
            record.get("conversations"), where, role_key="from", content_key="value", field="conversations"
        )
    if fmt == "text":
        return _text_field(record, "text", where, required=True)
    raise DatasetError(f"Unknown dataset format {fmt!r}; use one of: {', '.join(FORMATS)}.")
