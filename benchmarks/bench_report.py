"""Aggregate the worker records of a benchmark run, compute the issue's ratios and write the markdown tables.

Across repeats a mode's time is the median of its per-run medians (and the min of its per-run minima); its
memory is the median of its per-run step peaks (peak resident memory above the model, see ``bench_worker``).
Targets are ratios measured side by side in the same run; the issue states them for the medium config on a CPU,
and they are evaluated on every config for information.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from bench_models import get_config


@dataclass(frozen=True)
class Target:
    label: str
    numerator: str  # "mode.metric"
    denominator: str | None
    limit: float
    at_least: bool = False  # True: ratio >= limit passes (throughput); False: ratio <= limit passes

    def passes(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit


TARGETS = [
    Target("LoRA train step, dropout 0.05 / PEFT's", "lorakit_d05.time", "peft_d05.time", 0.80),
    Target("LoRA train step, dropout 0 / PEFT's", "lorakit_d0.time", "peft_d0.time", 0.95),
    Target("LoRA train step, dropout 0 / floor", "lorakit_d0.time", "floor.time", 1.10),
    Target("Step peak memory, dropout 0.05 / PEFT's", "lorakit_d05.mem", "peft_d05.mem", 0.85),
    Target("Unmerged inference / base", "lorakit_unmerged.time", "base.time", 1.05),
    Target("Merged inference / base (equal; 2% noise band)", "lorakit_merged.time", "base.time", 1.02),
    Target(
        "Mixed batch throughput / PEFT's (8 rows, 4 adapters)",
        "peft_mixed.time",
        "lorakit_mixed.time",
        2.0,
        at_least=True,
    ),
    Target("Mixed batch max abs logit diff vs PEFT", "mixed_check.max_abs_diff", None, 1e-5),
]

# Ratios the issue quotes for PEFT, measured again for context (no pass/fail).
REFERENCE_RATIOS = [
    ("PEFT train dropout 0.05 / full fine-tune (issue: 0.85)", "peft_d05.time", "full.time"),
    ("PEFT train dropout 0 / full fine-tune (issue: 0.71)", "peft_d0.time", "full.time"),
    ("PEFT dropout cost: d0.05 / d0 time (issue: ~1.19)", "peft_d05.time", "peft_d0.time"),
    ("PEFT step memory d0.05 / full fine-tune (issue: >= 1)", "peft_d05.mem", "full.mem"),
    ("PEFT unmerged inference / base (issue: 1.14)", "peft_unmerged.time", "base.time"),
    ("PEFT merged inference / base (issue: 1.00)", "peft_merged.time", "base.time"),
    ("floor / full fine-tune", "floor.time", "full.time"),
    ("PEFT train dropout 0 / floor", "peft_d0.time", "floor.time"),
    (
        "PEFT mixed batch / base model on the same 8 rows (the most any mixed batch can gain over PEFT)",
        "peft_mixed.time",
        "base_mixed.time",
    ),
    ("lorakit mixed batch / base model on the same 8 rows", "lorakit_mixed.time", "base_mixed.time"),
    ("lorakit train dropout 0.05 / full fine-tune", "lorakit_d05.time", "full.time"),
    ("lorakit dropout cost: d0.05 / d0 time", "lorakit_d05.time", "lorakit_d0.time"),
    ("lorakit step memory d0.05 / full fine-tune", "lorakit_d05.mem", "full.mem"),
    ("lorakit step memory d0 / floor", "lorakit_d0.mem", "floor.mem"),
    ("PEFT step memory d0 / floor", "peft_d0.mem", "floor.mem"),
    # torch.compile (modes with the +compile suffix, when run)
    ("lorakit train d0.05 compiled / eager", "lorakit_d05+compile.time", "lorakit_d05.time"),
    ("lorakit train d0.05 compiled / PEFT's eager", "lorakit_d05+compile.time", "peft_d05.time"),
    ("lorakit train d0.05 compiled / PEFT's compiled", "lorakit_d05+compile.time", "peft_d05+compile.time"),
    ("lorakit train d0 compiled / eager", "lorakit_d0+compile.time", "lorakit_d0.time"),
    ("lorakit train d0 compiled / floor compiled", "lorakit_d0+compile.time", "floor+compile.time"),
    ("lorakit step memory d0.05 compiled / eager", "lorakit_d05+compile.mem", "lorakit_d05.mem"),
    (
        "lorakit unmerged inference compiled / base compiled",
        "lorakit_unmerged+compile.time",
        "base+compile.time",
    ),
    # the trainer's CPU allocator policy (modes with the +keepmem suffix, when run)
    ("lorakit train d0.05 keepmem / default allocator", "lorakit_d05+keepmem.time", "lorakit_d05.time"),
    ("lorakit train d0 keepmem / default allocator", "lorakit_d0+keepmem.time", "lorakit_d0.time"),
    ("PEFT train d0 keepmem / default allocator", "peft_d0+keepmem.time", "peft_d0.time"),
    ("lorakit train d0 keepmem / floor keepmem", "lorakit_d0+keepmem.time", "floor+keepmem.time"),
    ("lorakit step memory d0.05 keepmem / default allocator", "lorakit_d05+keepmem.mem", "lorakit_d05.mem"),
]


def summarize(records: list[dict]) -> dict[str, dict[str, dict]]:
    """``{config: {mode: aggregate}}`` over all repeats."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        grouped.setdefault((record["config"], record["mode"]), []).append(record)
    summary: dict[str, dict[str, dict]] = {}
    for (config, mode), runs in grouped.items():
        good = [r for r in runs if not r.get("error")]
        entry: dict = {"runs": len(runs), "errors": sorted({r["error"] for r in runs if r.get("error")})}
        if mode in ("interleaved", "interleaved_train"):
            entry["paired_ratios"] = {
                key: statistics.median(r["paired_ratios"][key] for r in good if key in r["paired_ratios"])
                for key in sorted({k for r in good for k in r.get("paired_ratios", {})})
            }
            entry["rounds"] = sum(r.get("rounds", 0) for r in good)
            summary.setdefault(config, {})[mode] = entry
            continue
        timed = [r for r in good if "median_s" in r]
        if timed:
            entry["time"] = statistics.median(r["median_s"] for r in timed)
            entry["min_time"] = min(r["min_s"] for r in timed)
            entry["mem"] = statistics.median(r["step_mem_mb"] for r in timed)
            entry["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in timed)
            entry["trainable_params"] = timed[0].get("trainable_params")
        for key in (
            "max_abs_diff",
            "peft_vs_reference_max_abs_diff",
            "lorakit_vs_reference_max_abs_diff",
            "adapter_effect_max_abs",
            "lorakit_error",
            "peft_error",
            "logit_scale",
        ):
            values = [r[key] for r in good if key in r]
            if values:
                entry[key] = max(values) if isinstance(values[0], float) else values[0]
        summary.setdefault(config, {})[mode] = entry
    return summary


def _value(modes: dict[str, dict], ref: str) -> float | None:
    mode, metric = ref.split(".", 1)
    value = modes.get(mode, {}).get(metric)
    return value if isinstance(value, (int, float)) else None


def ratio(modes: dict[str, dict], numerator: str, denominator: str | None) -> float | None:
    top = _value(modes, numerator)
    if denominator is None or top is None:
        return top
    bottom = _value(modes, denominator)
    return top / bottom if bottom else None


def evaluate_targets(modes: dict[str, dict]) -> list[dict]:
    rows = []
    for target in TARGETS:
        value = ratio(modes, target.numerator, target.denominator)
        verdict = (
            "n/a" if value is None or math.isnan(value) else ("PASS" if target.passes(value) else "FAIL")
        )
        effect = modes.get("mixed_check", {}).get("adapter_effect_max_abs")
        if target.numerator.startswith("mixed_check.") and effect is not None and effect < 1e-3:
            verdict = "VACUOUS (the adapters barely change the logits)"
        fastest = None  # the same ratio from each mode's fastest step: less exposed to a loaded machine
        if target.numerator.endswith(".time"):
            fastest = ratio(
                modes,
                target.numerator.replace(".time", ".min_time"),
                target.denominator.replace(".time", ".min_time"),
            )
        rows.append(
            {
                "target": target.label,
                "value": value,
                "value_from_min": fastest,
                "limit": target.limit,
                "at_least": target.at_least,
                "result": verdict,
            }
        )
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def mode_table(modes: dict[str, dict]) -> list[str]:
    lines = [
        "| mode | median s/step | min s/step | tokens/s | step peak MiB (over model) | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode, entry in modes.items():
        if mode in ("prepare_adapters", "mixed_check", "interleaved", "interleaved_train"):
            continue
        note = "; ".join(entry["errors"])[:120]
        lines.append(
            f"| {mode} | {_fmt(entry.get('time'))} | {_fmt(entry.get('min_time'))} | "
            f"{_fmt(entry.get('tokens_per_s'), 0)} | {_fmt(entry.get('mem'), 0)} | {note} |"
        )
    return lines


def target_table(modes: dict[str, dict]) -> list[str]:
    lines = [
        "| target | measured (medians) | limit | result | same from fastest steps |",
        "|---|---:|---:|---|---:|",
    ]
    for row in evaluate_targets(modes):
        limit = f"{'≥' if row['at_least'] else '≤'} {_fmt(row['limit'], 2)}"
        lines.append(
            f"| {row['target']} | {_fmt(row['value'])} | {limit} | **{row['result']}** | "
            f"{_fmt(row['value_from_min'])} |"
        )
    return lines


def reference_table(modes: dict[str, dict]) -> list[str]:
    lines = ["| ratio | measured |", "|---|---:|"]
    for label, numerator, denominator in REFERENCE_RATIOS:
        value = ratio(modes, numerator, denominator)
        if value is not None:  # a partial run (--modes) leaves most of them out
            lines.append(f"| {label} | {_fmt(value)} |")
    return lines


def consistency_notes(modes: dict[str, dict]) -> list[str]:
    """Facts that make the comparison fair or unfair: same trainable parameters, the mixed-batch references."""
    notes = []
    for left, right in (("lorakit_d05", "peft_d05"), ("lorakit_d0", "peft_d0")):
        a, b = modes.get(left, {}).get("trainable_params"), modes.get(right, {}).get("trainable_params")
        if a is not None and b is not None:
            state = "equal" if a == b else "DIFFERENT"
            notes.append(f"- trainable parameters {left} {a:,} vs {right} {b:,}: {state}")
    check = modes.get("mixed_check", {})
    for key in (
        "adapter_effect_max_abs",
        "peft_vs_reference_max_abs_diff",
        "lorakit_vs_reference_max_abs_diff",
        "max_abs_diff",
    ):
        if key in check:
            notes.append(f"- mixed batch {key.replace('_', ' ')}: {_fmt(check[key])}")
    for key in ("lorakit_error", "peft_error"):
        if key in check:
            notes.append(f"- mixed batch {key.replace('_', ' ')}: {check[key]}")
    for error in check.get("errors", []):
        notes.append(f"- mixed check error: {error}")
    return notes


# Time ratios from the interleaved records (one process, alternating rounds): (label, key, limit, at_least).
INTERLEAVED_TARGETS = [
    ("LoRA train step, dropout 0.05 / PEFT's", "lorakit_d05/peft_d05", 0.80, False),
    ("LoRA train step, dropout 0 / PEFT's", "lorakit_d0/peft_d0", 0.95, False),
    ("LoRA train step, dropout 0 / floor", "lorakit_d0/floor", 1.10, False),
    ("Unmerged inference / base", "lorakit_unmerged/base", 1.05, False),
    ("Merged inference / base (equal; 2% noise band)", "lorakit_merged/base", 1.02, False),
    ("Mixed batch throughput / PEFT's (8 rows, 4 adapters)", "peft_mixed/lorakit_mixed", 2.0, True),
    ("(context) PEFT train step, dropout 0 / floor", "peft_d0/floor", None, False),
    ("(context) lorakit train step, dropout 0.05 / floor", "lorakit_d05/floor", None, False),
    ("(context) PEFT unmerged inference / base", "peft_unmerged/base", None, False),
    (
        "(context) PEFT mixed batch / base on the same rows: the most any mixed batch can gain",
        "peft_mixed/base_mixed",
        None,
        False,
    ),
    ("(context) lorakit mixed batch / base on the same rows", "lorakit_mixed/base_mixed", None, False),
]


def interleaved_table(modes: dict[str, dict]) -> list[str]:
    """The time targets again from the interleaved records: medians of per-round ratios."""
    entries = [
        modes[k] for k in ("interleaved_train", "interleaved") if modes.get(k, {}).get("paired_ratios")
    ]
    if not entries:
        return []
    ratios = {key: value for entry in entries for key, value in entry["paired_ratios"].items()}
    rounds = " and ".join(str(entry["rounds"]) for entry in entries)
    lines = [
        f"Interleaved in one process ({rounds} alternating rounds; median of per-round ratios):",
        "",
        "| ratio | measured | limit | result |",
        "|---|---:|---:|---|",
    ]
    for label, key, limit, at_least in INTERLEAVED_TARGETS:
        if key not in ratios:
            continue
        if limit is None:
            lines.append(f"| {label} | {_fmt(ratios[key])} | — | — |")
            continue
        target = Target(label, key, None, limit, at_least)
        bound = f"≥ {limit:.2f}" if at_least else f"≤ {limit:.2f}"
        verdict = "PASS" if target.passes(ratios[key]) else "FAIL"
        lines.append(f"| {label} | {_fmt(ratios[key])} | {bound} | **{verdict}** |")
    return lines + [""]


def markdown_report(summary: dict[str, dict[str, dict]]) -> str:
    parts = []
    for config_name, modes in summary.items():
        parts.append(f"### {config_name}: {get_config(config_name).describe()}\n")
        parts += mode_table(modes) + [""] + target_table(modes) + [""] + interleaved_table(modes)
        parts += reference_table(modes) + [""]
        parts += consistency_notes(modes) + [""]
    return "\n".join(parts)
