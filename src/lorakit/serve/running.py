"""The running rows of the engine: each request's decoding state, and the shared KV cache of all of them.

:class:`RunningBatch` admits a request (prefill alone, choose its first token, merge its cache rows into the
batch), advances every row by one token per :meth:`~RunningBatch.step` (one decode forward for all rows), and
drops finished or cancelled rows (their cache rows are index-selected away, see :mod:`lorakit.serve.kv_batch`).
Requests admitted together are prefilled together (left-padded; :meth:`ModelRunner.prefill`). A token is emitted
to the row's handle unless it is a stop token; ``max_new_tokens`` ends a row with "length".
Only the engine thread calls it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lorakit.serve.kv_batch import KVBatch
from lorakit.serve.request import GenerationRequest, RequestHandle
from lorakit.serve.runner import ModelRunner
from lorakit.serve.sampling import make_generator, next_tokens

PREFILL_TOKENS = 8192  # the most (padded) prompt tokens prefilled in one forward, unless one prompt is longer

Finish = Callable[[RequestHandle, str, "str | None"], None]


@dataclass
class Row:
    """One running request: its handle, sampling generator, last token and tokens generated so far."""

    handle: RequestHandle
    generator: torch.Generator | None
    last_token: int = 0
    generated: int = 0

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request


class RunningBatch:
    """The rows being decoded (in KV-cache row order) and their :class:`KVBatch`."""

    def __init__(self, runner: ModelRunner, finish: Finish, stats: Counter):
        self.runner = runner
        self.rows: list[Row] = []
        self.kv = KVBatch()
        self._finish = finish  # gives the handle its final event and updates the engine's books
        self._stats = stats

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, handles: list[RequestHandle]) -> None:
        """Prefill the prompts in chunks, emit each first token, and add the rows that did not finish at once.

        Prompts are sorted by length and chunked so that a chunk's padded size stays within
        :data:`PREFILL_TOKENS` (a longer prompt goes alone).
        """
        handles = sorted(handles, key=lambda h: len(h.request.prompt_ids))
        chunk: list[RequestHandle] = []
        for handle in handles:
            if chunk and (len(chunk) + 1) * len(handle.request.prompt_ids) > PREFILL_TOKENS:
                self._admit_together(chunk)
                chunk = []
            chunk.append(handle)
        self._admit_together(chunk)

    def _admit_together(self, handles: list[RequestHandle]) -> None:
        """One joint prefill; when it fails, one at a time, so only a request that fails alone errors."""
        if not handles:
            return
        requests = [h.request for h in handles]
        try:
            logits, kv = self.runner.prefill([q.prompt_ids for q in requests], [q.adapter for q in requests])
        except Exception as error:  # noqa: BLE001 -- reported on the request, the engine goes on
            if len(handles) > 1:
                for handle in handles:
                    self._admit_together([handle])
            else:
                self._finish(handles[0], "error", f"{type(error).__name__}: {error}")
            return
        self._stats["prefills"] += len(handles)
        rows = [
            Row(h, make_generator(q.seed, logits.device) if q.temperature > 0 else None)
            for h, q in zip(handles, requests)
        ]
        reasons = [self._accept(row, token) for row, token in zip(rows, self._choose(logits, rows))]
        keep = [i for i, reason in enumerate(reasons) if reason is None]
        kv.keep(keep)
        self.kv.extend(kv)
        self.rows.extend(rows[i] for i in keep)
        for row, reason in zip(rows, reasons):
            if reason is not None:
                self._finish(row.handle, reason, None)

    def step(self) -> None:
        """One decode step for every row; finished rows leave the batch. An error fails every row."""
        rows = self.rows
        try:
            logits = self.runner.decode(
                self.kv, [r.last_token for r in rows], [r.request.adapter for r in rows]
            )
        except Exception as error:  # noqa: BLE001 -- the running requests fail, the engine goes on
            self.fail_all(f"{type(error).__name__}: {error}")
            return
        self._stats["steps"] += 1
        reasons = [self._accept(row, token) for row, token in zip(rows, self._choose(logits, rows))]
        finished = [i for i, reason in enumerate(reasons) if reason is not None]
        self._remove(finished)  # the slots are free before anyone sees a final event
        for i in finished:
            self._finish(rows[i].handle, reasons[i], None)

    def fail_all(self, message: str) -> None:
        """End every row with an "error" event and start from an empty batch."""
        rows, self.rows, self.kv = self.rows, [], KVBatch()
        for row in rows:
            if not row.handle.done:
                self._finish(row.handle, "error", message)

    def drop(self, indices: list[int], reason: str = "cancelled") -> None:
        """End the rows ``indices`` with final event ``reason`` and free their slots."""
        handles = [self.rows[i].handle for i in indices]
        self._remove(indices)
        for handle in handles:
            self._finish(handle, reason, None)

    def _remove(self, indices: list[int]) -> None:
        if not indices:
            return
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        self.kv.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        requests = [r.request for r in rows]
        temperatures = [q.temperature for q in requests]
        return next_tokens(logits, temperatures, [q.top_p for q in requests], [r.generator for r in rows])

    def _accept(self, row: Row, token: int) -> str | None:
        """Record ``token`` for ``row`` and emit it unless it stops the row; the finish reason, if it ends."""
        row.generated += 1
        row.last_token = token
        row.handle.completion_tokens += 1
        self._stats["generated_tokens"] += 1
        request = row.request
        if token in request.stop_token_ids:
            return "stop"
        row.handle._emit(token)
        return "length" if row.generated >= request.max_new_tokens else None
