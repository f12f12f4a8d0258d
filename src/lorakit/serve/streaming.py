"""Streaming of ``lorakit serve``: token ids to text deltas (incremental detokenization that holds back an
incomplete UTF-8 tail and a possible stop-string prefix), server-sent events, and cancelling a request whose
client went away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from lorakit.serve.errors import EngineFailure

REPLACEMENT = "\ufffd"  # what decoding an incomplete UTF-8 sequence ends with


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
