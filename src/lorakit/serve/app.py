"""The OpenAI-compatible HTTP API of ``lorakit serve`` (FastAPI), in front of a :class:`BatchEngine`.

The request's ``model`` field picks what generates: the base model's served name (``base_name``) runs the base,
any other loaded adapter's name runs that adapter; the engine batches requests for different adapters together.

Routes: ``GET /v1/models`` (and ``/v1/models/{model}``), ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``stream``: server-sent events ending in ``data: [DONE]``), ``POST /v1/adapters`` ``{"name", "path"}``
and ``DELETE /v1/adapters/{name}`` (load / unload at runtime), ``GET /health``.

Nothing here blocks the event loop: tokens arrive through :meth:`RequestHandle.aevents`, loading an adapter runs in
a worker thread. A client that goes away (mid-stream or while waiting for a whole completion) cancels its request,
which frees its slot in the engine. Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``,
with OpenAI's status codes (400 instead of FastAPI's 422 for an invalid body).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from lorakit.serve.protocol import (
    NOT_IMPLEMENTED_FIELDS,
    AdapterLoadRequest,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)

INVALID = "invalid_request_error"
REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence ends with


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return ErrorResponse.of(self.message, self.type, self.param, self.code).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


# ------------------------------------------------------------------------------------------ detokenization


class TextStream:
    """Generated token ids -> text deltas, with stop strings.

    Each :meth:`add` decodes all ids so far (so that multi-token characters and tokenizers that merge spaces
    decode as they would at once) and returns the new text since the last delta, holding back a trailing
    incomplete UTF-8 sequence and a tail that could still become a stop string. When the text contains a stop
    string, :attr:`stopped` is set and the text is cut before it. :meth:`finish` returns what was held back.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.ids: list[int] = []
        self.text = ""  # the whole decoded text (cut at a stop string once stopped)
        self.sent = 0  # characters of text already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_index()
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut]
            return self._take(len(self.text))
        safe = len(self.text.rstrip(REPLACEMENT))
        return self._take(safe - self._partial_stop(safe))

    def finish(self) -> str:
        """Everything not yet returned (the final delta)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _stop_index(self) -> int | None:
        # a stop string can only start in text not returned yet: returned text never ends in part of one
        start = max(0, self.sent - max((len(stop) for stop in self.stops), default=0))
        found = [index for stop in self.stops if (index := self.text.find(stop, start)) >= 0]
        return min(found) if found else None

    def _partial_stop(self, end: int) -> int:
        """Length of the longest tail of ``text[:end]`` that is the beginning of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, end), longest, -1):
                if self.text.endswith(stop[:size], 0, end):
                    longest = size
                    break
        return longest


# ---------------------------------------------------------------------------------------------- generation


@dataclass
class Prepared:
    """A validated request, ready for the engine."""

    model: str  # the name the client asked for (echoed in responses)
    adapter: str  # the engine's adapter name (BASE_MODEL for the base)
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    stream: bool
    include_usage: bool


class EngineFailure(Exception):
    """The engine ended a request with an error (or dropped it while shutting down)."""


async def _close(iterator: Any) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


async def text_deltas(handle: Any, stream: TextStream) -> AsyncIterator[tuple[str, str | None]]:
    """``(text delta, finish_reason or None)`` from a handle's events; the last pair has the finish reason.

    A stop string cancels the handle (its slot is freed) and finishes with ``"stop"``.
    """
    events = handle.aevents()
    try:
        async for event in events:
            if event.token_id is not None:
                delta = stream.add(event.token_id)
                if stream.stopped:
                    handle.cancel()
                    yield delta, "stop"
                    return
                if delta:
                    yield delta, None
                continue
            if event.finish_reason in ("stop", "length"):
                yield stream.finish(), event.finish_reason
                return
            if event.finish_reason == "cancelled":
                raise EngineFailure("The request was cancelled (the server is shutting down).")
            raise EngineFailure(f"Generation failed: {event.error or event.finish_reason}")
        raise EngineFailure("The engine ended the request without a final event.")
    finally:
        await _close(events)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[Any], handle: Any) -> Any:
    """``await work``, but cancel ``handle`` (and ``work``) if the client disconnects first.

    Returns None after a disconnect (nobody is left to answer).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        handle.cancel()
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    handle.cancel()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, EngineFailure):
        pass
    return None


class EventStreamResponse(StreamingResponse):
    """Server-sent events; the body generator is closed however the response ends (a disconnect included)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self.body_iterator)


def sse(payload: Any) -> str:
    if hasattr(payload, "model_dump_json"):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# --------------------------------------------------------------------------------------------------- the app


class Server:
    """The state behind the routes: the engine, the tokenizer, and how names map to adapters."""

    def __init__(self, engine: Any, tokenizer: Any, *, base_name: str, default_max_tokens: int) -> None:
        from lorakit.serve.engine import BASE_MODEL

        self.engine = engine
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.base_adapter = BASE_MODEL
        self.default_max_tokens = default_max_tokens
        self.created = now()
        self.stop_token_ids = stop_token_ids(engine, tokenizer)

    # ------------------------------------------------------------------------------------------- models
    def adapter_for(self, model: str) -> str:
        if model == self.base_name:
            return self.base_adapter
        if model != self.base_adapter and model in self.engine.adapters():
            return model
        raise model_not_found(model)

    def models(self) -> list[ModelCard]:
        cards = [ModelCard(id=self.base_name, created=self.created)]
        cards += [
            ModelCard(id=name, created=self.created, parent=self.base_name)
            for name in self.engine.adapters()
            if name != self.base_name
        ]
        return cards

    def max_context(self) -> int | None:
        context = getattr(self.engine, "max_context", None)
        return int(context) if context else None

    # ------------------------------------------------------------------------------------------- requests
    def prepare(self, body: ChatCompletionRequest | CompletionRequest) -> Prepared:
        problem = body.unsupported()
        if problem is not None:
            param, message = problem
            raise APIError(400, message, param=param)
        adapter = self.adapter_for(body.model)
        if isinstance(body, ChatCompletionRequest):
            prompt_ids, param = self._chat_ids(body), "messages"
        else:
            prompt_ids, param = self._completion_ids(body), "prompt"
        requested = body.requested_tokens()
        max_new = self._budget(len(prompt_ids), requested, param)
        return Prepared(
            model=body.model,
            adapter=adapter,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stops=body.stop_strings(),
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )

    def _chat_ids(self, body: ChatCompletionRequest) -> list[int]:
        from lorakit.data.render import render_chat

        messages = [message.for_template() for message in body.messages]
        try:
            text = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        except Exception as error:  # a template's raise_exception (roles out of order, ...)
            raise APIError(
                400, f"The chat template refused the messages: {error}", param="messages"
            ) from error
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _completion_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = len(self.tokenizer)
            if any(not 0 <= token < vocab for token in prompt):
                raise APIError(400, f"Token ids must be in [0, {vocab}).", param="prompt")
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) else prompt
        ids = list(self.tokenizer(text)["input_ids"])
        if not ids:
            raise APIError(400, "The prompt is empty.", param="prompt")
        return ids

    def _budget(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        """``max_tokens``, or the default clipped to the room left in the context; 400 if it does not fit."""
        context = self.max_context()
        if requested is None:
            budget = self.default_max_tokens
            if context is not None:
                budget = min(budget, context - prompt_tokens)
            if budget >= 1:
                return budget
            requested = 1
        if context is not None and prompt_tokens + requested > context:
            where = "messages" if param == "messages" else "prompt"
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {where}, {requested} in the "
                f"completion). Please reduce the length of the {where} or completion.",
                param=param,
                code="context_length_exceeded",
            )
        return requested

    def submit(self, prepared: Prepared) -> Any:
        from lorakit.serve.engine import GenerationRequest, UnknownAdapterError

        request = GenerationRequest(
            prompt_ids=prepared.prompt_ids,
            adapter=prepared.adapter,
            max_new_tokens=prepared.max_new_tokens,
            temperature=prepared.temperature,
            top_p=prepared.top_p,
            stop_token_ids=self.stop_token_ids,
            seed=prepared.seed,
        )
        try:
            return self.engine.submit(request)
        except UnknownAdapterError as error:  # unloaded since adapter_for looked
            raise model_not_found(prepared.model) from error
        except ValueError as error:
            if getattr(self.engine, "_stopping", False):  # shutting down: try again elsewhere / later
                raise APIError(503, str(error), type="server_error", code="unavailable") from error
            raise APIError(400, str(error)) from error

    # ------------------------------------------------------------------------------------------- responses
    async def complete(self, request: Request, prepared: Prepared, chat: bool) -> Response:
        handle = self.submit(prepared)
        stream = TextStream(self.tokenizer, prepared.stops)

        async def collect() -> tuple[str, str]:
            parts = []
            async with aclosing(text_deltas(handle, stream)) as deltas:
                async for delta, reason in deltas:
                    parts.append(delta)
                    if reason is not None:
                        return "".join(parts), reason
            raise EngineFailure("The engine ended the request without a finish reason.")

        try:
            result = await unless_disconnected(request, collect(), handle)
        except EngineFailure as error:
            return APIError(500, str(error), type="server_error").response()
        finally:
            handle.cancel()  # a no-op once finished; frees the slot if anything above failed
        if result is None:
            return Response(status_code=499)  # the client is gone; nothing is sent
        text, reason = result
        usage = Usage.of(handle.prompt_tokens, handle.completion_tokens)
        if chat:
            choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)
            body: Any = ChatCompletion(model=prepared.model, choices=[choice], usage=usage)
        else:
            body = Completion(
                model=prepared.model, choices=[CompletionChoice(text=text, finish_reason=reason)], usage=usage
            )
        return JSONResponse(body.model_dump(mode="json"))

    def stream(self, prepared: Prepared, chat: bool) -> Response:
        handle = self.submit(prepared)
        stream = TextStream(self.tokenizer, prepared.stops)
        completion_id, created = new_id("chatcmpl" if chat else "cmpl"), now()

        def chunk(text: str | None, reason: str | None, *, role: bool = False) -> Any:
            if chat:
                delta = ChatDelta(role="assistant" if role else None, content=text)
                choice = ChatChunkChoice(delta=delta, finish_reason=reason)
                return ChatCompletionChunk(
                    id=completion_id, created=created, model=prepared.model, choices=[choice]
                )
            choice = CompletionChunkChoice(text=text or "", finish_reason=reason)
            return CompletionChunk(id=completion_id, created=created, model=prepared.model, choices=[choice])

        def usage_chunk() -> Any:
            usage = Usage.of(handle.prompt_tokens, handle.completion_tokens)
            kind = ChatCompletionChunk if chat else CompletionChunk
            return kind(id=completion_id, created=created, model=prepared.model, choices=[], usage=usage)

        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield sse(chunk("", None, role=True))
                async with aclosing(text_deltas(handle, stream)) as deltas:
                    async for delta, reason in deltas:
                        if delta:
                            yield sse(chunk(delta, None))
                        if reason is not None:
                            yield sse(chunk(None, reason))
                if prepared.include_usage:
                    yield sse(usage_chunk())
            except EngineFailure as error:
                yield sse(APIError(500, str(error), type="server_error").body())
            finally:
                handle.cancel()  # a no-op once finished; frees the slot of a client that went away
            yield SSE_DONE

        return EventStreamResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def stop_token_ids(engine: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a generation: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: list[int] = []
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    model = getattr(engine, "model", None)
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    candidates += eos if isinstance(eos, (list, tuple)) else [eos]
    for token in candidates:
        if isinstance(token, int) and token not in ids:
            ids.append(token)
    return tuple(ids)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _field_path(location: Sequence[Any]) -> list[str]:
    """A pydantic error location as the request's field path: without ``body`` and union member tags
    (``str``, ``list[int]``, ``TextPart``, ...), which name a type, not a field."""
    path = []
    for part in location:
        if isinstance(part, int):
            path.append(str(part))
        elif part != "body" and not ("[" in part or part in _TYPE_TAGS or part[:1].isupper()):
            path.append(part)
    return path


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """OpenAI-style message and ``param`` for pydantic's validation errors of a request body.

    One error is reported: the first, or for a field with several (one per member of a union type) the one that
    got deepest into the value, which is usually the member the client meant.
    """
    first = errors[0]
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    error = max(same_field, key=lambda e: len(e.get("loc", ())))
    location = _field_path(error.get("loc", ()))
    param = ".".join(location) or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        return (
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid "
            f"JSON.) {error.get('msg', '')}".strip(),
            None,
        )
    if kind == "extra_forbidden" and param:
        name = location[-1]
        if len(location) == 1 and name in NOT_IMPLEMENTED_FIELDS:
            return f"'{name}' is not supported by lorakit serve.", param
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        if param is None:
            return "The request has no body; expected a JSON object.", None
        return f"Missing required parameter: '{param}'.", param
    if kind == "model_attributes_type" and not location:
        return "The request body must be a JSON object.", None
    value = error.get("input")
    shown = (
        json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    )
    return f"Invalid value for '{param}': {error.get('msg', 'invalid')} (got {shown}).", param


def create_app(engine: Any, tokenizer: Any, *, base_name: str, default_max_tokens: int) -> FastAPI:
    """The FastAPI app serving ``engine`` (already started) under OpenAI's routes.

    ``base_name`` is the model name of the base (no adapter); ``default_max_tokens`` bounds a completion when the
    request gives no ``max_tokens`` (clipped to the room left in the context).
    """
    server = Server(engine, tokenizer, base_name=base_name, default_max_tokens=default_max_tokens)
    app = FastAPI(
        title="lorakit serve", summary="OpenAI-compatible API for a base model and its LoRA adapters"
    )
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error.errors())
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        message = f"{error.detail}: {request.method} {request.url.path}"
        body = APIError(error.status_code, message, code=code)
        return JSONResponse(
            body.body(), status_code=error.status_code, headers=getattr(error, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        message = f"The server had an error while processing your request ({type(error).__name__}: {error})."
        return APIError(500, message, type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = getattr(engine, "stats", {})
        return {"status": "ok", "models": [card.id for card in server.models()], "stats": _jsonable(stats)}

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=server.models())

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        for card in server.models():
            if card.id == model:
                return card
        raise model_not_found(model)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        prepared = server.prepare(body)
        if prepared.stream:
            return server.stream(prepared, chat=True)
        return await server.complete(request, prepared, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prepared = server.prepare(body)
        if prepared.stream:
            return server.stream(prepared, chat=False)
        return await server.complete(request, prepared, chat=False)

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoadRequest) -> ModelCard:
        if body.name in (base_name, server.base_adapter):
            raise APIError(400, f"'{body.name}' is the base model's name; pick another.", param="name")
        if body.name in engine.adapters():
            raise APIError(
                409, f"An adapter named '{body.name}' is loaded already.", param="name", code="adapter_exists"
            )
        try:
            await run_in_threadpool(engine.load_adapter, body.name, body.path)
        except Exception as error:  # a missing folder, another base's adapter, an unknown method, ...
            raise APIError(
                400, f"Could not load the adapter from {body.path}: {reason_of(error)}", param="path"
            ) from error
        return ModelCard(id=body.name, created=now(), parent=base_name)

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        from lorakit.serve.engine import UnknownAdapterError

        if name in (base_name, server.base_adapter):
            raise APIError(400, "The base model cannot be unloaded.", param="name")
        try:
            await run_in_threadpool(engine.unload_adapter, name)
        except UnknownAdapterError as error:
            raise model_not_found(name) from error
        except ValueError as error:  # requests for it are in flight
            raise APIError(409, str(error), param="name", code="adapter_busy") from error
        return {"id": name, "object": "model", "deleted": True}

    return app


def reason_of(error: BaseException) -> str:
    if isinstance(error, KeyError) and error.args:
        return str(error.args[0])
    if isinstance(error, (OSError, ValueError)) or type(error).__module__.startswith("lorakit."):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
