"""lorakit vs Hugging Face PEFT, side by side in one run: train step, peak memory, inference, mixed batches.

    python benchmarks/bench_lora.py --configs tiny,small,medium --repeats 3 --steps 5 --out results.json

The parent runs every (config, mode) in a fresh ``--worker`` subprocess (so each peak memory is its own),
alternating lorakit and PEFT and reversing the whole order on every other repeat (A B ... B A) so that drift in
the machine's load hits both sides alike. Each worker prints one JSON line; the parent prints a markdown table
of absolute times and of the issue's target ratios, marked PASS/FAIL, and writes everything to ``--out``.
See benchmarks/README.md for what each mode measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The modules whose code the benchmark measures (their uncommitted state is recorded with the results).
LORA_CORE_MODULES = ("layers", "lora_ops", "inject", "tuner", "peft_model", "config")

# Order of one repeat: each lorakit mode next to its PEFT twin.
RUN_ORDER = [
    "full",
    "floor",
    "lorakit_d05",
    "peft_d05",
    "lorakit_d0",
    "peft_d0",
    "base",
    "lorakit_unmerged",
    "peft_unmerged",
    "lorakit_merged",
    "peft_merged",
    "base_mixed",
    "lorakit_mixed",
    "peft_mixed",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", default="tiny,small", help="comma list of: tiny, small, medium, smollm2-135m"
    )
    parser.add_argument(
        "--modes", default=",".join(RUN_ORDER), help="comma list of modes to run (default: all)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of every mode; times are medians over them"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument(
        "--interleaved-rounds",
        type=int,
        default=0,
        help="after the repeats, time the inference and mixed-batch modes, then the training modes, side by "
        "side in one process for this many alternating rounds (0: skip); gives per-round time ratios",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="write all records, the summary and the machine here (JSON)"
    )
    parser.add_argument(
        "--report",
        default=None,
        metavar="RESULTS_JSON",
        help="print the tables of an earlier --out file again (runs nothing)",
    )
    parser.add_argument(
        "--worker-timeout", type=float, default=3600.0, help="seconds before a worker is killed"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: comma list of modes
    parser.add_argument("--config", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--repeats and --steps must be at least 1 and --warmup at least 0.")
    if args.interleaved_rounds % 2:
        parser.error("--interleaved-rounds must be even (as many rounds in each order).")
    return args


# ---------------------------------------------------------------------------------------------------- worker
def worker_main(args: argparse.Namespace) -> int:
    """Run the listed modes in this process, one JSON line each on stdout; exit 1 if any failed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bench_worker

    failed = False
    for mode in args.worker.split(","):
        record = bench_worker.run_mode(mode, args)
        failed |= record["error"] is not None
        print(json.dumps(record), flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------- parent
def worker_command(args: argparse.Namespace, mode: str, config: str, adapter_dir: str) -> list[str]:
    return [
        sys.executable,
        str(HERE / "bench_lora.py"),
        "--worker",
        mode,
        "--config",
        config,
        "--adapter-dir",
        adapter_dir,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]


def worker_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_worker(args: argparse.Namespace, mode: str, config: str, adapter_dir: str) -> dict:
    """One fresh process for one (config, mode); its JSON record, or a record holding the failure."""
    command = worker_command(args, mode, config, adapter_dir)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.worker_timeout, env=worker_env(args.threads)
        )
    except subprocess.TimeoutExpired:
        return {
            "mode": mode,
            "config": config,
            "error": f"worker timed out after {args.worker_timeout:.0f} s",
        }
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"mode": mode, "config": config, "error": f"worker exit {done.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def describe_record(record: dict) -> str:
    if record.get("error"):
        return f"ERROR {record['error'][:200]}"
    if "paired_ratios" in record:
        return json.dumps({k: round(v, 4) for k, v in record["paired_ratios"].items()})
    if "median_s" in record:
        return f"{record['median_s']:.4f} s/step (min {record['min_s']:.4f}), step peak {record['step_mem_mb']:.0f} MiB"
    return json.dumps({k: v for k, v in record.items() if "diff" in k or k.endswith("error")})


def run_config(args: argparse.Namespace, config: str, modes: list[str]) -> list[dict]:
    records = []
    with tempfile.TemporaryDirectory(prefix=f"lorakit-bench-{config}-") as adapter_dir:
        needs_adapters = any(m in ("lorakit_mixed", "peft_mixed") for m in modes)
        if needs_adapters:
            prepared = run_worker(args, "prepare_adapters", config, adapter_dir)
            records.append(prepared)
            log(f"[{config}] prepare_adapters: {describe_record(prepared)}")
        for repeat in range(args.repeats):
            order = modes if repeat % 2 == 0 else modes[::-1]
            for mode in order:
                record = run_worker(args, mode, config, adapter_dir) | {"repeat": repeat}
                records.append(record)
                log(f"[{config} r{repeat + 1}/{args.repeats}] {mode}: {describe_record(record)}")
        if needs_adapters:
            check = run_worker(args, "mixed_check", config, adapter_dir)
            records.append(check)
            log(f"[{config}] mixed_check: {describe_record(check)}")
        if args.interleaved_rounds > 0:
            rounds = argparse.Namespace(**{**vars(args), "steps": args.interleaved_rounds})
            if not needs_adapters:  # the mixed-batch modes need the adapters
                records.append(run_worker(args, "prepare_adapters", config, adapter_dir))
            for group in ("interleaved", "interleaved_train"):
                interleaved = run_worker(rounds, group, config, adapter_dir)
                records.append(interleaved)
                log(f"[{config}] {group}: {describe_record(interleaved)}")
    return records


def machine_info(args: argparse.Namespace) -> dict:
    import peft
    import torch
    import transformers

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if "model name" in line), ""
    )
    mem_kb = next(
        (int(line.split()[1]) for line in _read_lines("/proc/meminfo") if line.startswith("MemTotal")), 0
    )
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "mem_gib": round(mem_kb / 2**20, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lorakit_source": _git_state(),
        "loadavg_start": _loadavg(),
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    if args.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _loadavg() -> list[float]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else []


def _git_state() -> str:
    """Commit of the checkout and whether src/lorakit has uncommitted changes (the code actually measured)."""

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=HERE.parent, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    core = [f"src/lorakit/{name}.py" for name in LORA_CORE_MODULES]
    dirty = [line[3:] for line in git("status", "--porcelain", "--", *core).splitlines()]
    return f"{commit}{' + uncommitted ' + ', '.join(dirty) if dirty else ''}"


def parent_main(args: argparse.Namespace) -> int:
    import bench_models
    import bench_report
    import bench_worker

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for config in configs:
        bench_models.get_config(config)  # fail fast on a typo
    unknown = [m for m in modes if not bench_worker.is_known_mode(m)]
    if unknown:
        print(f"Unknown mode(s) {unknown}; choose from {', '.join(RUN_ORDER)}.", file=sys.stderr)
        return 2
    info = machine_info(args)
    started = time.time()
    records = [record for config in configs for record in run_config(args, config, modes)]
    info.update(loadavg_end=_loadavg(), wall_s=round(time.time() - started, 1))
    summary = bench_report.summarize(records)
    print_report(info, summary)
    if args.out:
        payload = {
            "machine": info,
            "summary": summary,
            "targets": {c: bench_report.evaluate_targets(m) for c, m in summary.items()},
            "records": records,
        }
        Path(args.out).write_text(json.dumps(payload, indent=1))
        log(f"wrote {args.out}")
    return 0


def print_report(info: dict, summary: dict) -> None:
    import bench_report

    load = (
        [round(x, 1) for x in info.get("loadavg_start", [])],
        [round(x, 1) for x in info.get("loadavg_end", [])],
    )
    gpu = f" ({info['gpu']})" if info.get("gpu") else ""
    print(
        f"Machine: {info['cpu']} ({info['usable_cpus']} usable CPUs, {info.get('mem_gib')} GiB), "
        f"torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}, "
        f"lorakit {info['lorakit_source']}; {info.get('device')}{gpu} {info.get('dtype')}, "
        f"{info.get('threads')} threads, {info.get('repeats')} repeat(s) x {info.get('steps')} steps "
        f"(+{info.get('warmup')} warm-up); load average {load[0]} -> {load[1]}\n"
    )
    print(bench_report.markdown_report(summary))


def reprint(path: str) -> int:
    import bench_report

    payload = json.loads(Path(path).read_text())
    print_report(payload["machine"], bench_report.summarize(payload["records"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return reprint(args.report)
    return worker_main(args) if args.worker else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
