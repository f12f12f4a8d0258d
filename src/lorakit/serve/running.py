"""The running rows of the engine: each request's decoding state, and the shared KV cache of all of them.

:class:`RunningBatch` admits a request (prefill alone, choose its first token, merge its cache rows into the
batch), advances every row by one token per :meth:`~RunningBatch.step` (one decode forward for all rows), and
drops finished or cancelled rows (their cache rows are index-selected away, see :mod:`lorakit.serve.kv_batch`).
A token is emitted to the row's handle unless it is a stop token; ``max_new_tokens`` ends a row with "length".
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

    def admit(self, handle: RequestHandle) -> None:
        """Prefill ``handle``'s prompt, emit its first token, and add it to the batch unless already finished."""
        request = handle.request
        try:
            logits, kv = self.runner.prefill(request.prompt_ids, request.adapter)
        except Exception as error:  # noqa: BLE001 -- reported on the request, the engine goes on
            self._finish(handle, "error", f"{type(error).__name__}: {error}")
            return
        self._stats["prefills"] += 1
        generator = make_generator(request.seed, logits.device) if request.temperature > 0 else None
        row = Row(handle, generator)
        reason = self._accept(row, self._choose(logits, [row])[0])
        if reason is None:
            self.kv.extend(kv)
            self.rows.append(row)
        else:
            self._finish(handle, reason, None)

    def step(self) -> None:
        """One decode step for every row; finished rows leave the batch. An error fails every row."""
        rows = self.rows
        try:
            logits = self.runner.decode(
                self.kv, [r.last_token for r in rows], [r.request.adapter for r in rows]
            )
        except Exception as error:  # noqa: BLE001 -- the running requests fail, the engine goes on
            message = f"{type(error).__name__}: {error}"
            self.rows, self.kv = [], KVBatch()
            for row in rows:
                self._finish(row.handle, "error", message)
            return
        self._stats["steps"] += 1
        reasons = [self._accept(row, token) for row, token in zip(rows, self._choose(logits, rows))]
        finished = [i for i, reason in enumerate(reasons) if reason is not None]
        self._remove(finished)  # the slots are free before anyone sees a final event
        for i in finished:
            self._finish(rows[i].handle, reasons[i], None)

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
