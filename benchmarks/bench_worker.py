"""One benchmark measurement in one fresh process: build the model, warm up, time N steps, measure peak memory.

Modes (the parent runs each in its own process so that its peak memory is its own):

* training steps (forward, causal-LM loss, backward, AdamW step, zero_grad):
  ``full`` (every weight trains), ``floor`` (every weight frozen and no adapter, but the embedding output requires
  grad, so backward still computes the input gradient of every layer: the least any LoRA step can cost),
  ``lorakit_d05`` / ``peft_d05`` (LoRA, dropout 0.05) and ``lorakit_d0`` / ``peft_d0`` (dropout 0);
* inference forwards under ``torch.inference_mode()``: ``base``, ``lorakit_unmerged`` / ``peft_unmerged``,
  ``lorakit_merged`` / ``peft_merged`` (``merge_adapter()``: the LoRA wrappers stay, the update is in the weight);
* mixed-adapter batches (8 rows over 4 adapters, ``model(input_ids, adapter_names=[...])``): ``lorakit_mixed`` /
  ``peft_mixed``; ``mixed_check`` compares the two outputs and each against a per-adapter reference;
  ``base_mixed`` is the base model alone on the same 8 rows: no mixed batch can be much faster than it;
* ``prepare_adapters`` writes the four mixed-batch adapters (created by PEFT) into ``--adapter-dir``;
* ``interleaved`` / ``interleaved_train``: the inference (training) modes of ``INTERLEAVED_GROUPS`` built side
  by side in one process and timed in alternating rounds (order reversed every other round). Memory is not measured there; the point is time
  ratios taken seconds apart in the same process, with ratios per round, which fresh processes on a
  noisy machine resolve only to several percent.

Time: wall clock per step (``perf_counter``, CUDA synchronised), median and min over the timed steps.
Memory: peak above the resident baseline taken after the model is built. On the CPU the kernel's resident
high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right after the baseline, so the peak is
the step's own (``ru_maxrss`` is the fallback where that is not allowed); on CUDA ``max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import statistics
import time
from collections.abc import Callable

import bench_models as bm
import torch

TRAIN_MODES = {
    "full": ("base", 0.0),
    "floor": ("base", 0.0),
    "lorakit_d05": ("lorakit", 0.05),
    "peft_d05": ("peft", 0.05),
    "lorakit_d0": ("lorakit", 0.0),
    "peft_d0": ("peft", 0.0),
}
INFERENCE_MODES = {
    "base": None,
    "lorakit_unmerged": "lorakit",
    "peft_unmerged": "peft",
    "lorakit_merged": "lorakit",
    "peft_merged": "peft",
}
MIXED_MODES = {"base_mixed": None, "lorakit_mixed": "lorakit", "peft_mixed": "peft"}
SPECIAL_MODES = ("mixed_check", "prepare_adapters", "interleaved", "interleaved_train")
# The side-by-side groups of the interleaved records: {record: (modes, {ratio name: (numerator, denominator)})}.
INTERLEAVED_GROUPS = {
    "interleaved": (
        (
            "base",
            "lorakit_unmerged",
            "peft_unmerged",
            "lorakit_merged",
            "base_mixed",
            "lorakit_mixed",
            "peft_mixed",
        ),
        {
            "lorakit_unmerged/base": ("lorakit_unmerged", "base"),
            "lorakit_merged/base": ("lorakit_merged", "base"),
            "peft_unmerged/base": ("peft_unmerged", "base"),
            "peft_mixed/lorakit_mixed": ("peft_mixed", "lorakit_mixed"),
            "peft_mixed/base_mixed": ("peft_mixed", "base_mixed"),
            "lorakit_mixed/base_mixed": ("lorakit_mixed", "base_mixed"),
        },
    ),
    "interleaved_train": (
        ("floor", "lorakit_d05", "peft_d05", "lorakit_d0", "peft_d0"),
        {
            "lorakit_d05/peft_d05": ("lorakit_d05", "peft_d05"),
            "lorakit_d0/peft_d0": ("lorakit_d0", "peft_d0"),
            "lorakit_d0/floor": ("lorakit_d0", "floor"),
            "peft_d0/floor": ("peft_d0", "floor"),
            "lorakit_d05/floor": ("lorakit_d05", "floor"),
        },
    ),
}
INTERLEAVED_MODES = INTERLEAVED_GROUPS["interleaved"][0]
ALL_MODES = [*TRAIN_MODES, *INFERENCE_MODES, *MIXED_MODES, *SPECIAL_MODES]
# Options a training or inference mode can take as suffixes, e.g. ``lorakit_d0+keepmem+compile``:
# ``+compile``: the wrapped transformers model under torch.compile (``.compile()`` after the adapters are in place;
# the compilation falls in the untimed warm-up step, so keep ``--warmup`` >= 1);
# ``+keepmem``: the trainer's CPU allocator policy (lorakit.train.cpu_memory.keep_freed_memory) set first.
MODE_OPTIONS = ("compile", "keepmem")


def plain_mode(mode: str) -> str:
    return mode.split("+", 1)[0]


def mode_options(mode: str) -> set[str]:
    return set(mode.split("+")[1:])


def is_known_mode(mode: str) -> bool:
    if "+" in mode:
        base = plain_mode(mode)
        valid = set(MODE_OPTIONS)
        return (base in TRAIN_MODES or base in INFERENCE_MODES) and mode_options(mode) <= valid
    return mode in ALL_MODES


def _apply_options(model: torch.nn.Module, mode: str) -> None:
    if "compile" in mode_options(mode):
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner.compile()


def _allocator_policy(mode: str) -> None:
    if "keepmem" in mode_options(mode):
        from lorakit.train.cpu_memory import keep_freed_memory

        if not keep_freed_memory():
            raise RuntimeError("+keepmem needs glibc's mallopt, which this system does not have.")


# ------------------------------------------------------------------------------------------------ memory
def _proc_status_kb(field: str) -> int | None:
    try:
        text = open("/proc/self/status").read()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class MemoryMeter:
    """Peak memory of the measured steps above the baseline taken by ``start()``, in MiB."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.method = "cuda.max_memory_allocated" if self.cuda else "VmHWM"
        self.baseline_mb = 0.0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_mb = torch.cuda.memory_allocated() / 2**20
            return
        try:  # give freed heap pages back so that they do not hide in the baseline
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.baseline_mb = (_proc_status_kb("VmRSS") or 0) / 1024
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset the peak-RSS high-water mark to the current RSS
        except OSError:
            self.method = "ru_maxrss (high-water mark not resettable: includes model build)"

    def peak_mb(self) -> float:
        """Absolute peak (MiB) since ``start()``."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        if self.method == "VmHWM":
            return (_proc_status_kb("VmHWM") or 0) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ------------------------------------------------------------------------------------------------ timing
def time_steps(step: Callable[[], object], warmup: int, steps: int, device: str) -> list[float]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------------- setups
def _require_grad_output(_module, _inputs, output):
    return output.requires_grad_()


def setup_train(mode: str, config, args) -> tuple[Callable[[], object], dict]:
    """The model and the step closure for a training mode, plus facts to report."""
    library, dropout = TRAIN_MODES[plain_mode(mode)]
    _allocator_policy(mode)
    model = bm.build_base_model(config, args.seed, bm.DTYPES[args.dtype], args.device)
    if library != "base":
        model = bm.wrap_with_lora(library, model, dropout)
    elif plain_mode(mode) == "floor":
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(_require_grad_output)
    model.train()
    _apply_options(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    batch = bm.token_batch(config, config.batch, args.seed, args.device)

    def step():
        loss = model(input_ids=batch, labels=batch).loss
        if not loss.requires_grad:
            raise RuntimeError(f"{mode}: the loss has no graph, backward would be a no-op.")
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    facts = {"trainable_params": sum(p.numel() for p in params), "dropout": dropout, "library": library}
    return step, facts | {"rows": config.batch, "tokens_per_step": config.batch * config.seq}


def setup_inference(mode: str, config, args) -> tuple[Callable[[], object], dict]:
    library = INFERENCE_MODES[plain_mode(mode)]
    _allocator_policy(mode)
    model = bm.build_base_model(config, args.seed, bm.DTYPES[args.dtype], args.device)
    if library is not None:
        model = bm.wrap_with_lora(library, model, 0.0, init_lora_weights=False)
        if plain_mode(mode).endswith("_merged"):
            model.merge_adapter()
    model.eval()
    _apply_options(model, mode)
    batch = bm.token_batch(config, config.batch, args.seed, args.device)

    def step():
        with torch.inference_mode():
            return model(input_ids=batch).logits

    return step, {
        "library": library or "base",
        "rows": config.batch,
        "tokens_per_step": config.batch * config.seq,
    }


def setup_mixed(mode: str, config, args) -> tuple[Callable[[], object], dict]:
    library = MIXED_MODES[mode]
    base = bm.build_base_model(config, args.seed, bm.DTYPES[args.dtype], args.device)
    batch = bm.token_batch(config, bm.MIXED_ROWS, args.seed, args.device)
    facts = {
        "library": library or "base",
        "rows": bm.MIXED_ROWS,
        "tokens_per_step": bm.MIXED_ROWS * config.seq,
    }
    if library is None:  # the base model alone on the same rows
        base.eval()

        def base_step():
            with torch.inference_mode():
                return base(input_ids=batch).logits

        return base_step, facts
    _need_adapter_dir(args)
    model = bm.load_mixed_adapters(library, base, args.adapter_dir)
    names = bm.mixed_adapter_names()

    def step():
        with torch.inference_mode():
            return model(input_ids=batch, adapter_names=names).logits

    return step, facts


SETUPS = {
    **dict.fromkeys(TRAIN_MODES, setup_train),
    **dict.fromkeys(INFERENCE_MODES, setup_inference),
    **dict.fromkeys(MIXED_MODES, setup_mixed),
}


# -------------------------------------------------------------------------------------------- special modes
def _need_adapter_dir(args) -> None:
    if not args.adapter_dir:
        raise ValueError("This mode needs --adapter-dir (a folder written by --worker prepare_adapters).")


def _per_adapter_reference(model, batch: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Row i run with only adapter names[i] active (``set_adapter``), the ground truth for a mixed batch."""
    rows = []
    with torch.inference_mode():
        for index, name in enumerate(names):
            model.set_adapter(name)
            rows.append(model(input_ids=batch[index : index + 1]).logits)
    return torch.cat(rows)


def run_mixed_check(config, args) -> dict:
    """Max |difference| of the mixed-batch logits: lorakit vs PEFT, and each vs the per-adapter reference."""
    _need_adapter_dir(args)
    dtype = bm.DTYPES[args.dtype]
    batch = bm.token_batch(config, bm.MIXED_ROWS, args.seed, args.device)
    names = bm.mixed_adapter_names()
    result: dict = {"rows": bm.MIXED_ROWS, "adapters": sorted(set(names))}
    outputs = {}
    for library in ("peft", "lorakit"):
        model = bm.load_mixed_adapters(
            library, bm.build_base_model(config, args.seed, dtype, args.device), args.adapter_dir
        )
        try:
            with torch.inference_mode():
                mixed = model(input_ids=batch, adapter_names=names).logits.float()
        except Exception as error:  # noqa: BLE001 - an unsupported API is a result, not a crash
            result[f"{library}_error"] = f"{type(error).__name__}: {error}"
            continue
        reference = _per_adapter_reference(model, batch, names).float()
        outputs[library] = mixed
        result[f"{library}_vs_reference_max_abs_diff"] = (mixed - reference).abs().max().item()
        if library == "peft":  # the adapters must move the logits, or every comparison here is vacuous
            with torch.inference_mode(), model.disable_adapter():
                base = model(input_ids=batch).logits.float()
            result["adapter_effect_max_abs"] = (mixed - base).abs().max().item()
        del model
    if len(outputs) == 2:
        result["max_abs_diff"] = (outputs["lorakit"] - outputs["peft"]).abs().max().item()
        result["logit_scale"] = outputs["peft"].abs().max().item()
    return result


def run_interleaved(group: str, config, args) -> dict:
    """Time the modes of ``INTERLEAVED_GROUPS[group]`` in one process: ``args.steps`` rounds, each mode once.

    Returns per-mode step times plus, for each ratio of the group, the median over rounds of the per-round
    ratio (numerator and denominator timed seconds apart).
    """
    group_modes, pairs = INTERLEAVED_GROUPS[group]
    modes = [m for m in group_modes if m not in MIXED_MODES or MIXED_MODES[m] is None or args.adapter_dir]
    steps = {}
    for mode in modes:
        steps[mode], _ = SETUPS[mode](mode, config, args)
        for _ in range(max(args.warmup, 1)):
            steps[mode]()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for round_index in range(args.steps):
        for mode in modes if round_index % 2 == 0 else modes[::-1]:
            sync()
            start = time.perf_counter()
            steps[mode]()
            sync()
            times[mode].append(time.perf_counter() - start)
    ratios = {
        name: statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))
        for name, (num, den) in pairs.items()
        if num in times and den in times
    }
    return {
        "modes": modes,
        "rounds": args.steps,
        "times_s": times,
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "min_s": {m: min(t) for m, t in times.items()},
        "paired_ratios": ratios,
    }


def run_mode(mode: str, args) -> dict:
    """Measure ``mode``; returns the JSON-able record (``error`` set instead of raising)."""
    config = bm.get_config(args.config)
    torch.set_num_threads(args.threads)
    record = {
        "mode": mode,
        "config": config.name,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
        "error": None,
    }
    if args.device.startswith("cuda"):
        record["device_name"] = torch.cuda.get_device_name()
    try:
        if mode == "prepare_adapters":
            _need_adapter_dir(args)
            record["adapters"] = bm.write_mixed_adapters(config, args.seed, args.adapter_dir)
        elif mode == "mixed_check":
            record.update(run_mixed_check(config, args))
        elif mode in INTERLEAVED_GROUPS:
            record.update(run_interleaved(mode, config, args))
        else:
            record.update(_measure(mode, config, args))
    except Exception as error:  # noqa: BLE001 - reported to the parent in the JSON line
        record["error"] = f"{type(error).__name__}: {error}"
    return record


def _measure(mode: str, config, args) -> dict:
    if not is_known_mode(mode) or plain_mode(mode) not in SETUPS:
        raise ValueError(
            f"Unknown mode {mode!r}; choose from {', '.join(ALL_MODES)} (+compile, +keepmem suffixes)."
        )
    if "compile" in mode_options(mode) and args.warmup < 1:
        raise ValueError(f"{mode}: give --warmup 1 or more, so that compiling is not timed.")
    start = time.perf_counter()
    step, facts = SETUPS[plain_mode(mode)](mode, config, args)
    build_s = time.perf_counter() - start
    meter = MemoryMeter(args.device)
    meter.start()
    times = time_steps(step, args.warmup, args.steps, args.device)
    peak = meter.peak_mb()
    median = statistics.median(times)
    return facts | {
        "times_s": times,
        "median_s": median,
        "min_s": min(times),
        "build_s": build_s,
        "baseline_mem_mb": meter.baseline_mb,
        "peak_mem_mb": peak,
        "step_mem_mb": max(peak - meter.baseline_mb, 0.0),
        "mem_method": meter.method,
        "tokens_per_s": facts["tokens_per_step"] / median,
    }
