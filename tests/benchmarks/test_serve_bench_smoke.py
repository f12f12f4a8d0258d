"""Smoke test of benchmarks/serve_bench.py on the tiny model: every mode runs and produces the greedy tokens of
single-adapter ``generate`` (what makes its speed comparison fair). Not timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"


def test_serve_bench_runs_every_mode_with_exact_tokens(tmp_path) -> None:
    out = tmp_path / "serve.json"
    command = [
        sys.executable,
        str(BENCH),
        "--model",
        "tiny",
        "--clients",
        "4",
        "--requests",
        "2",
        "--new-tokens",
        "6",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in records] == [
        "lorakit_set_adapter",
        "lorakit",
        "serial",
        "peft_set_adapter",
        "peft_mixed",
    ]
    for record in records[1:]:  # the first mode's tokens are the reference the others are compared with
        assert record["equal_to_generate"] == "8/8", record
    for record in records:
        assert record["tokens_per_s"] > 0 and record["p99_latency_s"] >= record["p50_latency_s"] > 0
    assert "| lorakit |" in result.stdout
