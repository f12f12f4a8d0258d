"""Requests, token events and the handle a caller reads them from (re-exported by :mod:`lorakit.serve.engine`).

The engine thread pushes :class:`TokenEvent` objects into a handle; a caller reads them either blocking
(:meth:`RequestHandle.events`, from any thread) or from asyncio (:meth:`RequestHandle.aevents`, which waits on an
``asyncio.Event`` set through ``loop.call_soon_threadsafe``, so no thread of the event loop blocks). Each event is
delivered once; the last one has ``token_id=None`` and a ``finish_reason``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

BASE_MODEL = "__base__"  # the adapter value of a request for the base model

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class GenerationRequest:
    """What to generate: ``temperature=0`` is greedy; ``stop_token_ids`` end generation (not emitted)."""

    prompt_ids: list[int]
    adapter: str = BASE_MODEL
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass
class TokenEvent:
    """One generated token (``finish_reason=None``), or the final event (``token_id=None``)."""

    token_id: int | None
    finish_reason: str | None
    error: str | None = None


_ids = itertools.count(1)


class RequestHandle:
    """A submitted request: its events, its token counts, and :meth:`cancel`.

    ``completion_tokens`` counts every generated token, a stop token included (it is not emitted as an event).
    """

    def __init__(self, request: GenerationRequest, on_cancel: Callable[[], None] | None = None):
        self.id = f"req-{next(_ids)}"
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._events: deque[TokenEvent] = deque()
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._cancelled = False
        self._on_cancel = on_cancel

    # ------------------------------------------------------------------------------------------- caller side
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed at the next step (final event "cancelled")."""
        if self._cancelled or self.done:
            return
        self._cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """Blocking iterator over the events; ends after the final one.

        ``timeout``: the longest wait for the next event, after which ``TimeoutError`` is raised. Leaving the
        iterator before the final event (``break``, an exception, the timeout) cancels the request.
        """
        final = False
        try:
            while True:
                with self._cond:
                    deadline = None if timeout is None else time.monotonic() + timeout
                    while not self._events:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise TimeoutError(f"No event of request {self.id} within {timeout} s.")
                        self._cond.wait(left)
                    event = self._events.popleft()
                final = event.finish_reason is not None
                yield event
                if final:
                    return
        finally:
            if not final:
                self.cancel()

    async def aevents(self) -> AsyncIterator[TokenEvent]:
        """Async iterator over the events (for asyncio servers); ends after the final one.

        Leaving it before the final event (``break``, the task cancelled as a client disconnects) cancels the
        request.
        """
        loop = asyncio.get_running_loop()
        final = False
        try:
            while True:
                with self._cond:
                    event = self._events.popleft() if self._events else None
                    if event is None:
                        ready = asyncio.Event()
                        self._waiters.append((loop, ready))
                if event is None:
                    await ready.wait()
                    continue
                final = event.finish_reason is not None
                yield event
                if final:
                    return
        finally:
            if not final:
                self.cancel()

    # ------------------------------------------------------------------------------------------- engine side
    def _push(self, event: TokenEvent) -> None:
        with self._cond:
            if self.finish_reason is not None:
                return  # finished already: nothing may follow the final event
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
            self._events.append(event)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the loop was closed: nobody is listening any more
                pass

    def _emit(self, token_id: int) -> None:
        self._push(TokenEvent(token_id, None))

    def _finish(self, reason: str, error: str | None = None) -> None:
        self._push(TokenEvent(None, reason, error))
