"""QLoRA vs fp32 LoRA on the same model: weight memory, peak training memory and step time (CPU or GPU).

    python benchmarks/qlora_memory.py                        # SmolLM2-135M shapes, CPU or the GPU if there is one
    python benchmarks/qlora_memory.py --preset tiny --steps 3
    python benchmarks/qlora_memory.py --device cuda --preset 1b --compute-dtype bfloat16 --output qlora.json

Both modes build the same random Llama model (``torch.manual_seed(0)``, fp32), ``qlora-nf4`` then quantizes its
Linear layers with ``lorakit.quant.quantize_model`` (embeddings, norms and the head stay fp32). Both add the same
LoRA adapter (r=16, alpha=32, all seven projections) and run AdamW steps on one random batch.

Each mode runs in its own process, so its peak is its own:

* weight memory -- bytes of all parameters and buffers of the model before adapters, and of the Linear layers
  alone (``bits/weight`` = their bytes * 8 / their weights: 32 for fp32, ~4.127 for NF4);
* peak memory during training -- CPU: the resident high-water mark (``VmHWM``), reset through
  ``/proc/self/clear_refs`` after the model is built and quantized, minus the resident size after the imports
  (glibc is told to return large blocks to the system, ``MALLOC_MMAP_THRESHOLD_``, so freed fp32 weights do
  not linger); CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``;
* step time -- median wall time of the timed steps (forward, loss, backward, optimizer step), after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

PRESETS = {
    # odd widths on purpose: 688 and 1000 are not multiples of 64 or 32
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),  # TinyLlama-1.1B shapes
}
MODES = ("lora-fp32", "qlora-nf4")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 1 << 20


# ----------------------------------------------------------------------------------------------- worker side
def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak bytes since :meth:`reset`: CUDA allocator statistics, or the process' resident high-water mark."""

    def __init__(self, device):
        self.device = device
        self.cpu_source = "VmHWM"

    def current(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return (_status_kb("VmRSS") or 0) * 1024

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        except OSError:
            self.cpu_source = "ru_maxrss (not resettable: includes model building)"

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.cpu_source == "VmHWM" and _status_kb("VmHWM") is not None:
            return _status_kb("VmHWM") * 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _weight_bytes(model) -> tuple[int, int, int]:
    """(bytes of all parameters and buffers, bytes of the Linear layers, weights in the Linear layers)."""
    import torch.nn as nn

    from lorakit.quant import Linear4bit

    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    linear_bytes = linear_weights = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            linear_bytes += module.storage_bytes()
            linear_weights += module.in_features * module.out_features
        elif isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            linear_bytes += module.weight.numel() * module.weight.element_size()
            linear_weights += module.weight.numel()
    return total, linear_bytes, linear_weights


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit import LoraConfig, get_peft_model
    from lorakit.quant import quantize_model

    device = torch.device(args.device)
    meter = PeakMemory(device)
    after_imports = meter.current()

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**PRESETS[args.preset], max_position_embeddings=max(args.seq, 64)))
    model.to(device)
    start = time.perf_counter()
    if args.mode == "qlora-nf4":
        quantize_model(model, compute_dtype=args.compute_dtype)
    quantize_seconds = time.perf_counter() - start
    weight_bytes, linear_bytes, linear_weights = _weight_bytes(model)

    torch.manual_seed(0)
    config = LoraConfig(target_modules=PROJECTIONS, r=16, lora_alpha=32, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = torch.randint(
        0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)
    ).to(device)

    import gc

    gc.collect()
    before_training = meter.current()
    meter.reset()
    times, losses = [], []
    for step in range(args.steps + 1):  # step 0 is the warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = meter.peak()
    reference = 0 if device.type == "cuda" else after_imports
    return {
        "mode": args.mode,
        "device": str(device),
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "compute_dtype": args.compute_dtype if args.mode == "qlora-nf4" else "float32",
        "weight_mib": weight_bytes / MIB,
        "linear_weight_mib": linear_bytes / MIB,
        "linear_bits_per_weight": 8 * linear_bytes / max(linear_weights, 1),
        "linear_weights": linear_weights,
        "trainable_params": sum(p.numel() for p in trainable),
        "resident_before_training_mib": (before_training - reference) / MIB,
        "peak_training_mib": (peak - reference) / MIB,
        "peak_source": "cuda allocator"
        if device.type == "cuda"
        else meter.cpu_source + " minus RSS after imports",
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "quantize_seconds": quantize_seconds,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


# ----------------------------------------------------------------------------------------------- parent side
def _run_mode(mode: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        mode,
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--threads",
        str(args.threads),
        "--compute-dtype",
        args.compute_dtype,
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{mode} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(results: list[dict]) -> str:
    rows = [
        ("weights, whole model (MiB)", "weight_mib", "{:.1f}"),
        ("weights, Linear layers (MiB)", "linear_weight_mib", "{:.1f}"),
        ("bits per Linear weight", "linear_bits_per_weight", "{:.3f}"),
        ("resident before training (MiB)", "resident_before_training_mib", "{:.1f}"),
        ("peak during training (MiB)", "peak_training_mib", "{:.1f}"),
        ("step time, median (s)", "step_seconds_median", "{:.3f}"),
        ("step time, min (s)", "step_seconds_min", "{:.3f}"),
        ("quantization time (s)", "quantize_seconds", "{:.2f}"),
        ("loss first -> last", None, None),
    ]
    lines = [f"{'':34}" + "".join(f"{r['mode']:>16}" for r in results) + f"{'first/second':>14}"]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{r['loss_first']:.3f}->{r['loss_last']:.3f}" for r in results]
            lines.append(f"{label:34}" + "".join(f"{c:>16}" for c in cells))
            continue
        values = [r[key] for r in results]
        ratio = f"{values[0] / values[1]:>13.2f}x" if len(values) == 2 and values[0] and values[1] else ""
        lines.append(f"{label:34}" + "".join(f"{fmt.format(v):>16}" for v in values) + ratio)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda if available)")
    parser.add_argument(
        "--compute-dtype", default=None, help="QLoRA compute dtype (default: fp32 on CPU, bf16 on GPU)"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--output", help="also write the results as JSON here")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.compute_dtype is None:
        args.compute_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.worker:
        args.mode = args.worker
        print(json.dumps(run_worker(args)))
        return 0
    results = [_run_mode(mode, args) for mode in args.modes]
    first = results[0]
    print(
        f"preset {args.preset}, device {first['device']}, batch {args.batch} x {args.seq} tokens, "
        f"{args.steps} timed steps, {args.threads} CPU threads, QLoRA compute dtype {args.compute_dtype}, "
        f"LoRA r=16 on all projections ({first['trainable_params']:,} trainable parameters)"
    )
    print(f"memory: {first['peak_source']}\n")
    print(_table(results))
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
