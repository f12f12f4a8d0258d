"""The generation engine of ``lorakit serve``: continuous batching over a KV cache, one adapter per request.

A background thread loops:

1. run the queued adapter commands (:meth:`BatchEngine.load_adapter` / :meth:`~BatchEngine.unload_adapter`),
   so the model only changes between decode steps;
2. drop cancelled requests, waiting or running (a running row's KV cache rows are index-selected away);
3. admit waiting requests while fewer than ``max_batch_size`` run: prefill them together (left-padded), choose
   their first tokens, and merge their KV cache into the running batch (:mod:`lorakit.serve.kv_batch`: left
   padding, an attention mask and per-row positions, so each row sees exactly its own tokens);
4. one decode step for every running row (input ``(B, 1)``), rows of different adapters in one forward
   (:mod:`lorakit.serve.runner`, with per-adapter sub-batches for adapters that cannot mix), then the next token
   of each row (argmax, or a seeded top-p draw), emitted to the row's :class:`RequestHandle`;
5. finished rows (a stop token, ``max_new_tokens`` reached) leave the batch; the columns that became padding in
   every row are trimmed.

With greedy decoding a request gets the tokens ``model.generate(do_sample=False)`` gives with its adapter active,
whatever the other rows are (up to float rounding of the different batch shapes).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future

import torch
from torch import nn

from lorakit.serve.request import BASE_MODEL, GenerationRequest, RequestHandle, TokenEvent
from lorakit.serve.runner import ModelRunner
from lorakit.serve.running import RunningBatch

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_MODEL",
    "BatchEngine",
    "GenerationRequest",
    "RequestHandle",
    "TokenEvent",
    "UnknownAdapterError",
]


class UnknownAdapterError(KeyError):
    """A request or command named an adapter the engine does not serve."""

    def __init__(self, adapter: str, known: list[str]):
        self.adapter = adapter
        self.known = known
        super().__init__(f"Unknown adapter {adapter!r}; available: {[BASE_MODEL, *known]}.")

    def __str__(self) -> str:
        return self.args[0]


class BatchEngine:
    """Continuous batching of :class:`GenerationRequest` s over ``model`` (see the module docstring)."""

    def __init__(
        self, model: nn.Module, tokenizer=None, *, max_batch_size: int = 16, max_context: int | None = None
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
        model.eval()
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model)
        self.max_batch_size = max_batch_size
        config = getattr(model, "config", None)
        self.max_context = max_context or getattr(config, "max_position_embeddings", None)
        self._known = list(self.runner.adapter_names())
        self._inflight: Counter[str] = Counter()
        self._waiting: deque[RequestHandle] = deque()
        self._commands: deque[tuple[Callable[[], None], Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False  # refuse new requests; the thread exits once nothing is in flight
        self._abort = False  # cancel everything in flight, then exit
        self._closed = False  # the thread has left its loop
        self._stats = Counter(steps=0, generated_tokens=0, prefills=0)
        self._running = RunningBatch(self.runner, self._finish, self._stats)

    @property
    def model(self) -> nn.Module:
        return self.runner.model

    # ----------------------------------------------------------------------------------------------- control
    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = self._abort = self._closed = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-batch-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with ``drain`` finish those in flight (until ``timeout``), else cancel them."""
        with self._cond:
            self._stopping = True
            self._abort = self._abort or not drain
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                with self._cond:
                    self._abort = True
                    self._cond.notify_all()
                thread.join(timeout)
        else:
            with self._cond:
                self._cancel_waiting(all_of_them=True)

    @property
    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._running), "waiting": len(self._waiting), **self._stats}

    # ---------------------------------------------------------------------------------------------- requests
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; its tokens come through the returned handle."""
        if not request.prompt_ids:
            raise ValueError("The prompt is empty.")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}.")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise ValueError(
                f"Need temperature >= 0 and 0 < top_p <= 1, got {request.temperature}, {request.top_p}."
            )
        total = len(request.prompt_ids) + request.max_new_tokens
        if self.max_context is not None and total > self.max_context:
            raise ValueError(
                f"The prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) "
                f"exceeds the context of {self.max_context} tokens."
            )
        with self._cond:
            if self._stopping:
                raise ValueError("The engine is stopped; it accepts no new requests.")
            if request.adapter != BASE_MODEL and request.adapter not in self._known:
                raise UnknownAdapterError(request.adapter, list(self._known))
            handle = RequestHandle(request, on_cancel=self._wake)
            self._inflight[request.adapter] += 1
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------------------- adapters
    def adapters(self) -> list[str]:
        """The adapters requests may name (besides :data:`BASE_MODEL`), in loading order."""
        with self._cond:
            return list(self._known)

    def load_adapter(self, name: str, path: str) -> None:
        """Load the adapter saved in ``path`` as ``name`` (between decode steps; returns once loaded)."""

        def load() -> None:
            if name == BASE_MODEL or name in self._known or name in self.runner.adapter_names():
                raise ValueError(
                    f"An adapter named {name!r} exists already; unload it first or pick another name."
                )
            if self.runner.is_peft:
                self.model.load_adapter(path, name)
            else:
                from lorakit.peft_model import PeftModel

                self.runner.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            self.model.eval()
            self.runner.invalidate()
            with self._cond:
                self._known.append(name)

        if name == BASE_MODEL or name in self.adapters():
            raise ValueError(
                f"An adapter named {name!r} exists already; unload it first or pick another name."
            )
        self._call(load)

    def unload_adapter(self, name: str) -> None:
        """Delete adapter ``name``; refused (``ValueError``) while requests for it are waiting or running."""
        with self._cond:
            if name not in self._known:
                raise UnknownAdapterError(name, list(self._known))
            if self._inflight[name]:
                raise ValueError(
                    f"Adapter {name!r} has {self._inflight[name]} request(s) in flight; not unloaded."
                )
            self._known.remove(name)  # from now on submit() refuses it

        def unload() -> None:
            try:
                self.model.delete_adapter(name)
            except Exception:
                with self._cond:
                    self._known.append(name)
                raise
            finally:
                self.runner.invalidate()

        self._call(unload)

    def _call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the engine thread between two steps (inline when no engine thread runs)."""
        future: Future = Future()
        with self._cond:
            queued = (
                self._thread is not None
                and not self._closed
                and threading.current_thread() is not self._thread
            )
            if queued:
                self._commands.append((command, future))
                self._cond.notify_all()
        if queued:
            future.result()
        else:
            command()

    def _run_commands(self) -> None:
        while True:
            with self._cond:
                if not self._commands:
                    return
                command, future = self._commands.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    with torch.inference_mode(False):  # adapter weights must not be inference tensors
                        command()
                except BaseException as error:  # noqa: BLE001 -- handed to the caller
                    future.set_exception(error)
                else:
                    future.set_result(None)

    # ------------------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                self._run_commands()
                running, admitted = self._running, []
                try:
                    running.drop([i for i, r in enumerate(running.rows) if r.handle.cancelled or self._abort])
                    with self._cond:
                        self._cancel_waiting(all_of_them=self._abort)
                        admitted = self._take_waiting()
                        if not admitted and not running:
                            if self._stopping and not self._waiting:
                                self._closed = True  # commands now run inline in their caller
                                break
                            if not self._commands:
                                self._cond.wait(0.5)
                            continue
                    running.admit(admitted)
                    if running:
                        running.step()
                except Exception as error:  # a bug here must not leave requests waiting forever
                    logger.exception("The batch engine failed; its running requests end with an error.")
                    message = f"{type(error).__name__}: {error}"
                    running.fail_all(message)
                    for handle in admitted:
                        if not handle.done:
                            self._finish(handle, "error", message)
            self._run_commands()  # those queued before the loop closed

    def _cancel_waiting(self, all_of_them: bool = False) -> None:
        """Finish the waiting requests that were cancelled (all of them when aborting). Holds ``_cond``."""
        for handle in [h for h in self._waiting if all_of_them or h.cancelled]:
            self._waiting.remove(handle)
            self._finish(handle, "cancelled")

    def _take_waiting(self) -> list[RequestHandle]:
        free = self.max_batch_size - len(self._running)
        return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _finish(self, handle: RequestHandle, reason: str, error: str | None = None) -> None:
        with self._cond:  # re-entrant use is fine: Condition wraps an RLock
            self._inflight[handle.request.adapter] -= 1
        handle._finish(reason, error)  # after the books: a caller seeing it may unload the adapter
