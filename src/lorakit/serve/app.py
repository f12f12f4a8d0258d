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

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from lorakit.serve.errors import (
    APIError,
    EngineFailure,
    jsonable,
    model_not_found,
    reason_of,
    validation_message,
)
from lorakit.serve.protocol import (
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
    ModelCard,
    ModelList,
    Usage,
    new_id,
    now,
)
from lorakit.serve.streaming import (
    SSE_DONE,
    EventStreamResponse,
    TextStream,
    sse,
    text_deltas,
    unless_disconnected,
)


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
        return {"status": "ok", "models": [card.id for card in server.models()], "stats": jsonable(stats)}

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
