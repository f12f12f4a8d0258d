"""Run metrics: one JSON object per line in ``metrics.jsonl``, plus the end-of-run summary.

Train lines: ``{"step", "epoch", "loss", "lr", "grad_norm", "tokens", "input_tokens", "tokens_per_s",
"elapsed_s"}`` (``tokens``: trained tokens of the step; ``tokens_per_s``: input tokens, padding excluded);
eval lines: ``{"step", "eval_loss", "eval_ppl", "eval_tokens"}`` with ``eval_ppl = exp(eval_loss)``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    """Append-only JSONL writer; a no-op on ranks other than 0 (``enabled=False``).

    ``listeners`` (e.g. :meth:`lorakit.train.trackers.Trackers.log_record`) get every record written, so
    experiment trackers see exactly the numbers and steps of the file.
    """

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = path
        self.enabled = enabled
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        for listener in self.listeners:
            listener(record)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (from a killed run) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_metrics(path: Path, keep_records: int) -> None:
    """Keep the first ``keep_records`` records: a resumed run rewrites what came after its checkpoint."""
    records = read_metrics(path)[:keep_records]
    temp = path.with_suffix(".tmp")
    temp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    os.replace(temp, path)


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite instead of overflowing."""
    return math.exp(loss) if loss < 700 else math.inf


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def format_summary(summary: dict[str, Any]) -> str:
    """A few human lines about the finished run."""
    trainable, total = summary["trainable_params"], summary["total_params"]
    lines = [
        f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)",
        f"steps: {summary['steps']}  trained tokens: {summary['trained_tokens']:,}  "
        f"training time: {summary['train_time_s']:.1f} s (whole run {summary.get('run_time_s', 0):.0f} s)  peak memory: {summary['peak_memory_bytes'] / 2**20:.0f} MiB",
    ]
    if summary.get("eval_loss_start") is not None and summary.get("eval_loss_end") is not None:
        lines.append(
            f"held-out loss: {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}  "
            f"(perplexity {perplexity(summary['eval_loss_start']):.2f} -> {perplexity(summary['eval_loss_end']):.2f})"
        )
    if summary.get("best_step") is not None:
        stopped = f"; stopped early at step {summary['steps']}" if summary.get("stopped_early") else ""
        lines.append(
            f"best held-out loss: {summary['best_eval_loss']:.4f} at step {summary['best_step']}"
            f" (the saved adapter){stopped}"
        )
    return "\n".join(lines)
