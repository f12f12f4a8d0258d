"""Metrics JSONL, resume truncation, summary text and the loss-curve PNG."""

from __future__ import annotations

import math

from lorakit.train.metrics import MetricsLog, format_summary, perplexity, read_metrics, truncate_metrics
from lorakit.train.plot import plot_loss_curves


def test_metrics_write_read_truncate(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 5, "eval_loss": 0.5, "eval_ppl": perplexity(0.5)})
    with open(path, "a") as handle:
        handle.write('{"step": 6, "lo')  # torn line from a killed run
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 5]
    truncate_metrics(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    truncate_metrics(path, 10)  # fewer records than asked for: all kept
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(tmp_path / "other.jsonl", enabled=False).write({"step": 1})
    assert not (tmp_path / "other.jsonl").exists()


def test_perplexity_and_summary() -> None:
    assert abs(perplexity(math.log(7.0)) - 7.0) < 1e-12 and perplexity(1e4) == math.inf
    text = format_summary(
        {
            "trainable_params": 1000,
            "total_params": 100000,
            "steps": 10,
            "trained_tokens": 12345,
            "train_time_s": 3.21,
            "peak_memory_bytes": 512 * 2**20,
            "eval_loss_start": math.log(20.0),
            "eval_loss_end": math.log(5.0),
        }
    )
    assert "1,000 of 100,000 (1.000%)" in text and "512 MiB" in text and "20.00 -> 5.00" in text


def test_plot_writes_png(tmp_path) -> None:
    records = [{"step": s, "loss": 2.0 / s} for s in range(1, 20)] + [{"step": 10, "eval_loss": 0.3}]
    path = plot_loss_curves(records, tmp_path / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
