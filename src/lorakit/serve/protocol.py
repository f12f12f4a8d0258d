"""The OpenAI API subset that ``lorakit serve`` speaks: request, response, stream-chunk and error bodies.

Requests are validated strictly, as OpenAI does: a string where a number belongs, an unknown field or a
missing ``model`` is a 400 ``invalid_request_error`` (see :mod:`lorakit.serve.app`), never a silent
coercion. Fields that OpenAI defines but lorakit cannot honour (``logprobs``, penalties, ``logit_bias``,
tools, ``echo``, ...) are accepted at their neutral value only; :meth:`_SamplingRequest.unsupported` names
the first one set to anything else. Fields with no effect on the output (``user``, ``metadata``,
``store``, ...) are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

# OpenAI's own limit on stop sequences per request.
MAX_STOP_SEQUENCES = 4

# OpenAI parameters that lorakit serve does not implement at all: named in the error instead of
# "Unrecognized request argument".
NOT_IMPLEMENTED_FIELDS = frozenset(
    {
        "audio",
        "modalities",
        "prediction",
        "functions",
        "function_call",
        "reasoning_effort",
        "verbosity",
        "web_search_options",
    }
)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message. ``developer`` is OpenAI's newer name for ``system`` and is rendered as one."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted, not rendered (chat templates have no place for it)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class _SamplingRequest(_Request):
    """Options shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(default=1, ge=1)
    user: str | None = None
    # Known to OpenAI, accepted at their neutral values only.
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, int | float] | None = None

    def stop_strings(self) -> list[str]:
        """The stop sequences, empty ones dropped."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [stop for stop in stops if stop]

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` for the first option lorakit serve cannot honour, else None."""
        if (self.n or 1) > 1:
            return "n", "n > 1 is not supported by lorakit serve; send one request per completion."
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            return "stop", f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed."
        if self.stream_options is not None and not self.stream:
            return (
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by lorakit serve (only 0)."
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by lorakit serve."
        return None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # No effect on the output.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        found = super().unsupported()
        if found:
            return found
        if self.logprobs or self.top_logprobs:
            return "logprobs", "logprobs are not supported by lorakit serve."
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format", "Only response_format {'type': 'text'} is supported by lorakit serve."
        if self.tools:
            return "tools", "Tool calling is not supported by lorakit serve."
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "Tool calling is not supported by lorakit serve."
        return None


class CompletionRequest(_SamplingRequest):
    """The legacy completions endpoint: one prompt, as text or as token ids (a list of one text too)."""

    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool | None = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    def requested_tokens(self) -> int | None:
        return self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        found = super().unsupported()
        if found:
            return found
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) > 1:
                return "prompt", "Batched prompts are not supported by lorakit serve; send one per request."
        if isinstance(self.prompt, list) and not self.prompt:
            return "prompt", "The prompt is empty."
        if self.logprobs:
            return "logprobs", "logprobs are not supported by lorakit serve."
        if self.echo:
            return "echo", "echo is not supported by lorakit serve."
        if (self.best_of or 1) > 1:
            return "best_of", "best_of > 1 is not supported by lorakit serve."
        if self.suffix:
            return "suffix", "suffix is not supported by lorakit serve."
        return None


class AdapterLoadRequest(_Request):
    """POST /v1/adapters: serve the adapter folder ``path`` under the model name ``name``."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


# ----------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """A stream delta: only the keys that are set (``{}`` in the last chunk, as OpenAI sends it)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_keys_only(self) -> dict[str, Any]:
        return {
            key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None
        }


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """``chat.completion.chunk``; the optional usage chunk (``stream_options.include_usage``) has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    """A streamed ``text_completion`` (OpenAI uses the same object name for chunks)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorakit"
    parent: str | None = None  # the base model an adapter applies to; None for the base itself


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

    @classmethod
    def of(cls, message: str, type: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
        return cls(error=ErrorDetail(message=message, type=type, param=param, code=code))
