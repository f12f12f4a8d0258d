"""Smoke test of the benchmark harness (benchmarks/bench_lora.py): not timed, it checks the harness works.

One worker process runs every mode once on the tiny config and must print one well-formed JSON record per mode;
the parent's bookkeeping (run order, PASS/FAIL against the issue's limits) is checked in-process on made-up
records.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_lora  # noqa: E402
import bench_report  # noqa: E402

TIMED_FIELDS = (
    "times_s",
    "median_s",
    "min_s",
    "build_s",
    "baseline_mem_mb",
    "peak_mem_mb",
    "step_mem_mb",
    "tokens_per_s",
    "tokens_per_step",
    "rows",
    "library",
    "mem_method",
)


@pytest.fixture(scope="module")
def worker_records(tmp_path_factory) -> dict[str, dict]:
    adapter_dir = tmp_path_factory.mktemp("adapters")
    modes = [
        "prepare_adapters",
        *bench_lora.RUN_ORDER,
        "mixed_check",
        "interleaved",
        "interleaved_train",
        "lorakit_d0+keepmem",  # last: the allocator policy stays for the rest of the process
    ]
    command = [
        sys.executable,
        str(BENCH_DIR / "bench_lora.py"),
        "--worker",
        ",".join(modes),
        "--config",
        "tiny",
        "--adapter-dir",
        str(adapter_dir),
        "--steps",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=bench_lora.worker_env(threads=1)
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in records] == modes, done.stderr[-2000:]
    assert done.returncode == 0, [r["error"] for r in records if r["error"]]
    return {r["mode"]: r for r in records}


@pytest.mark.parametrize("mode", [*bench_lora.RUN_ORDER, "lorakit_d0+keepmem"])
def test_timed_mode_record(worker_records, mode):
    record = worker_records[mode]
    assert record["error"] is None
    assert record["config"] == "tiny" and record["threads"] == 1 and record["steps"] == 2
    for field in TIMED_FIELDS:
        assert field in record, field
    assert len(record["times_s"]) == 2 and all(t > 0 for t in record["times_s"])
    assert record["min_s"] <= record["median_s"] <= max(record["times_s"])
    assert record["step_mem_mb"] >= 0 and record["peak_mem_mb"] > 0
    expected_rows = 8 if mode.endswith("_mixed") else 2  # tiny: batch 2 x 32; mixed: 8 rows over 4 adapters
    assert record["rows"] == expected_rows and record["tokens_per_step"] == expected_rows * 32
    assert record["tokens_per_s"] == pytest.approx(record["tokens_per_step"] / record["median_s"])


def test_train_modes_train_what_they_claim(worker_records):
    # LoRA r=8 on the 7 projections of 2 layers: r * (in + out) per projection; hidden 64, 4 heads of 16 with
    # 2 key/value heads (k, v out = 32), intermediate 176.
    per_layer = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 176) * 3)
    for mode in ("lorakit_d05", "peft_d05", "lorakit_d0", "peft_d0"):
        assert worker_records[mode]["trainable_params"] == 2 * per_layer, mode
    assert worker_records["floor"]["trainable_params"] == 0  # and its loss had a graph (else error is set)
    # Full fine-tune: embeddings + untied LM head (1000 x 64 each), per layer q, o (64x64), k, v (32x64), MLP
    # (3 x 64x176) and two RMSNorm weights, plus the final norm.
    layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 176 + 2 * 64
    assert worker_records["full"]["trainable_params"] == 2 * 1000 * 64 + 2 * layer + 64
    assert worker_records["lorakit_d05"]["dropout"] == 0.05 and worker_records["peft_d0"]["dropout"] == 0.0


def test_mixed_check_record(worker_records):
    check = worker_records["mixed_check"]
    assert check["error"] is None and check["rows"] == 8 and check["adapters"] == ["a0", "a1", "a2", "a3"]
    assert (
        check["adapter_effect_max_abs"] > 1e-2
    )  # the adapters move the logits: the comparison means something
    assert check["peft_vs_reference_max_abs_diff"] < 1e-5  # PEFT's mixed batch equals one adapter at a time
    assert math.isfinite(check["max_abs_diff"]) and math.isfinite(check["lorakit_vs_reference_max_abs_diff"])


@pytest.mark.parametrize("group", ["interleaved", "interleaved_train"])
def test_interleaved_record_times_every_mode_each_round(worker_records, group):
    import bench_worker

    record = worker_records[group]
    modes, pairs = bench_worker.INTERLEAVED_GROUPS[group]
    assert record["error"] is None and record["rounds"] == 2 and record["modes"] == list(modes)
    times = record["times_s"]
    for mode in modes:
        assert len(times[mode]) == 2 and all(t > 0 for t in times[mode])
    assert set(record["paired_ratios"]) == set(pairs)
    for name, (numerator, denominator) in pairs.items():
        expected = statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))
        assert record["paired_ratios"][name] == pytest.approx(expected)


def test_interleaved_table_judges_the_paired_ratios():
    records = [
        {"config": "medium", "mode": "interleaved", "error": None, "rounds": 5, "paired_ratios": r}
        for r in (
            {"lorakit_unmerged/base": 1.04, "peft_mixed/lorakit_mixed": 1.2, "peft_mixed/base_mixed": 1.1},
            {"lorakit_unmerged/base": 1.08, "peft_mixed/lorakit_mixed": 1.4, "peft_mixed/base_mixed": 1.3},
        )
    ]
    entry = bench_report.summarize(records)["medium"]["interleaved"]
    assert entry["rounds"] == 10 and entry["paired_ratios"]["lorakit_unmerged/base"] == pytest.approx(1.06)
    table = "\n".join(bench_report.interleaved_table({"interleaved": entry}))
    assert "| Unmerged inference / base | 1.060 | ≤ 1.05 | **FAIL** |" in table
    assert "| Mixed batch throughput / PEFT's (8 rows, 4 adapters) | 1.300 | ≥ 2.00 | **FAIL** |" in table
    assert "the most any mixed batch can gain | 1.200 |" in table
    train = {"mode": "interleaved_train", "rounds": 3, "paired_ratios": {"lorakit_d0/floor": 1.09}}
    table = "\n".join(bench_report.interleaved_table({"interleaved": entry, "interleaved_train": train}))
    assert "(3 and 10 alternating rounds" in table
    assert "| LoRA train step, dropout 0 / floor | 1.090 | ≤ 1.10 | **PASS** |" in table


def test_worker_reports_errors_in_the_record(tmp_path):
    args = bench_lora.parse_args(["--worker", "lorakit_mixed", "--config", "tiny"])  # no --adapter-dir
    import bench_worker

    record = bench_worker.run_mode("lorakit_mixed", args)
    assert record["error"].startswith("ValueError") and "--adapter-dir" in record["error"]


def _fake(config: str, mode: str, time_s: float, mem: float = 100.0, **extra) -> dict:
    return {
        "config": config,
        "mode": mode,
        "error": None,
        "median_s": time_s,
        "min_s": time_s * 0.9,
        "step_mem_mb": mem,
        "tokens_per_s": 1000 / time_s,
        **extra,
    }


def test_targets_pass_and_fail_at_the_issue_limits():
    records = [
        _fake("medium", "peft_d05", 10.0, mem=1000.0),
        _fake("medium", "lorakit_d05", 8.0, mem=860.0),
        _fake("medium", "peft_d0", 10.0),
        _fake("medium", "lorakit_d0", 9.4),
        _fake("medium", "floor", 8.0),
        _fake("medium", "base", 1.0),
        _fake("medium", "lorakit_unmerged", 1.06),
        _fake("medium", "lorakit_merged", 1.0),
        _fake("medium", "peft_mixed", 4.0),
        _fake("medium", "lorakit_mixed", 2.0),
        {
            "config": "medium",
            "mode": "mixed_check",
            "error": None,
            "max_abs_diff": 2e-5,
            "adapter_effect_max_abs": 0.5,
        },
    ]
    rows = {r["target"]: r for r in bench_report.evaluate_targets(bench_report.summarize(records)["medium"])}
    results = [r["result"] for r in rows.values()]
    # 0.80 <= 0.80 PASS; 0.94 PASS; 9.4/8 = 1.175 > 1.10 FAIL; memory 0.86 FAIL; unmerged 1.06 FAIL;
    # merged 1.00 PASS; mixed throughput 4/2 = 2.0 PASS; 2e-5 > 1e-5 FAIL.
    assert results == ["PASS", "PASS", "FAIL", "FAIL", "FAIL", "PASS", "PASS", "FAIL"]
    assert rows["LoRA train step, dropout 0 / floor"]["value"] == pytest.approx(9.4 / 8.0)
    assert rows["LoRA train step, dropout 0 / floor"]["value_from_min"] == pytest.approx(9.4 / 8.0)


def test_summary_takes_medians_over_repeats_and_keeps_errors():
    records = [_fake("small", "base", t) for t in (3.0, 1.0, 2.0)]
    records.append({"config": "small", "mode": "base", "error": "worker timed out after 10 s"})
    entry = bench_report.summarize(records)["small"]["base"]
    assert entry["time"] == 2.0 and entry["min_time"] == pytest.approx(0.9) and entry["runs"] == 4
    assert entry["errors"] == ["worker timed out after 10 s"]
    assert "worker timed out" in bench_report.markdown_report({"small": {"base": entry}})


def test_parent_alternates_order_and_brackets_mixed_runs(monkeypatch, tmp_path):
    calls = []

    def fake_run_worker(args, mode, config, adapter_dir):
        calls.append(mode)
        return _fake(config, mode, 1.0)

    monkeypatch.setattr(bench_lora, "run_worker", fake_run_worker)
    monkeypatch.setattr(
        bench_lora,
        "machine_info",
        lambda args: {
            "cpu": "test",
            "usable_cpus": 1,
            "torch": "t",
            "transformers": "t",
            "peft": "p",
            "lorakit_source": "x",
            "loadavg_start": [],
        },
    )
    out = tmp_path / "results.json"
    argv = [
        "--configs",
        "tiny",
        "--modes",
        "lorakit_d0,peft_d0,lorakit_mixed",
        "--repeats",
        "2",
        "--out",
        str(out),
    ]
    assert bench_lora.main(argv) == 0
    assert calls == [
        "prepare_adapters",
        "lorakit_d0",
        "peft_d0",
        "lorakit_mixed",
        "lorakit_mixed",
        "peft_d0",
        "lorakit_d0",
        "mixed_check",
    ]
    payload = json.loads(out.read_text())
    assert set(payload) == {"machine", "summary", "targets", "records"} and len(payload["records"]) == 8


def test_unknown_config_and_mode_are_refused(capsys):
    with pytest.raises(ValueError, match="Unknown benchmark config 'huge'"):
        bench_lora.main(["--configs", "huge"])
    assert bench_lora.main(["--configs", "tiny", "--modes", "fastest"]) == 2
    assert "Unknown mode(s) ['fastest']" in capsys.readouterr().err


def test_parent_runs_the_interleaved_rounds_last_with_their_own_step_count(monkeypatch):
    calls = []

    def fake_run_worker(args, mode, config, adapter_dir):
        calls.append((mode, args.steps))
        return _fake(config, mode, 1.0)

    monkeypatch.setattr(bench_lora, "run_worker", fake_run_worker)
    argv = [
        "--configs",
        "tiny",
        "--modes",
        "base",
        "--repeats",
        "1",
        "--steps",
        "4",
        "--interleaved-rounds",
        "6",
    ]
    bench_lora.run_config(bench_lora.parse_args(argv), "tiny", ["base"])
    # no mixed mode among --modes: the adapters are still prepared, for the interleaved mixed batches
    assert calls == [("base", 4), ("prepare_adapters", 4), ("interleaved", 6), ("interleaved_train", 6)]
    with pytest.raises(SystemExit):  # an odd count would run one order more often than the other
        bench_lora.parse_args(["--interleaved-rounds", "5"])


def test_mode_suffixes_are_known_only_for_train_and_inference_modes():
    import bench_worker

    assert bench_worker.is_known_mode("lorakit_d05+compile") and bench_worker.is_known_mode("base+compile")
    assert not bench_worker.is_known_mode("lorakit_mixed+compile")  # mixed batches are not compiled
    assert not bench_worker.is_known_mode("nothing+compile")
    assert bench_worker.is_known_mode("lorakit_d0+keepmem+compile")
    assert not bench_worker.is_known_mode("lorakit_d0+turbo")
    assert bench_worker.plain_mode("peft_d0+keepmem") == "peft_d0"
    args = bench_lora.parse_args(["--worker", "lorakit_d0+compile", "--config", "tiny", "--warmup", "0"])
    record = bench_worker.run_mode("lorakit_d0+compile", args)  # compiling would fall in a timed step
    assert "--warmup 1 or more" in record["error"]
    records = [_fake("small", "lorakit_d05", 2.0), _fake("small", "lorakit_d05+compile", 1.5)]
    table = bench_report.reference_table(bench_report.summarize(records)["small"])
    assert "| lorakit train d0.05 compiled / eager | 0.750 |" in table
