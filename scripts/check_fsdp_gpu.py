#!/usr/bin/env python
"""GPU check of ``lorakit train --distributed fsdp``: FSDP2 over NCCL in bf16, with and without the 4-bit base.

Run from the repository root on a machine with one or more NVIDIA GPUs:

    python scripts/check_fsdp_gpu.py            # prints "skipped: no CUDA" and exits 0 where there is no GPU

It builds a tiny random Llama and a character tokenizer in a temporary folder, writes a small JSONL dataset and
runs ``torchrun --standalone --nproc_per_node=min(2, GPUs) -m lorakit train --distributed fsdp --precision bf16
--device cuda ...`` three times: over the fp32 base, over the 4-bit NF4 base (``--load_in_4bit``) and with
``--fsdp_cpu_offload``. One GPU runs one process: FSDP over a world of 1 still goes through NCCL and bf16. For
each run it prints the ``fsdp:`` line and the losses; it exits 1 when a run fails, a loss is not finite, the
held-out loss did not fall or the adapter is missing. ``--cpu`` runs the first two on CPU processes (gloo), to
check the script itself where there is no GPU. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["apple", "river", "stone", "cloud", "green", "tiger", "lemon", "piano", "mouse", "ocean"]


def save_tiny_model(folder: Path) -> None:
    """A 2-block random Llama (hidden 32, vocab 128) and a character-level tokenizer, as a transformers folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.disable_progress_bar()

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)


def write_records(path: Path, count: int, offset: int = 0) -> None:
    """Alpaca-style records with a learnable rule: the answer is the word reversed."""
    lines = []
    for i in range(offset, offset + count):
        word = WORDS[i % len(WORDS)] + str(i % 7)
        lines.append(json.dumps({"instruction": f"Reverse {word}", "input": "", "output": word[::-1]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run(name: str, folder: Path, processes: int, device: str, precision: str, extra: list[str]) -> bool:
    """One torchrun of ``lorakit train``; prints the fsdp line and the losses, returns whether all is well."""
    out = folder / name
    flags = {
        "model": folder / "model", "dataset": folder / "train.jsonl", "eval_dataset": folder / "eval.jsonl",
        "output_dir": out, "distributed": "fsdp", "precision": precision, "device": device, "lora_r": 4,
        "lora_alpha": 8, "learning_rate": "1e-2", "micro_batch_size": 2, "gradient_accumulation_steps": 2,
        "max_steps": 8, "eval_steps": 4, "save_steps": 4, "max_seq_length": 64, "sample_max_new_tokens": 4,
    }  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command += ["-m", "lorakit", "train", *[t for k, v in flags.items() for t in (f"--{k}", str(v))], *extra]
    print(f"\n== {name}: {' '.join(command[1:])}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        print(f"FAILED (exit {result.returncode})\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return False
    print(next((line for line in result.stdout.splitlines() if line.startswith("fsdp:")), "no fsdp: line!"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    held_out = [r["eval_loss"] for r in records if "eval_loss" in r]
    print("train loss by step: " + " ".join(f"{value:.4f}" for value in losses))
    print("held-out loss:      " + " ".join(f"{value:.4f}" for value in held_out))
    problems = [] if "fsdp:" in result.stdout else ["no 'fsdp:' line in the output"]
    if not losses or not all(math.isfinite(value) for value in losses + held_out):
        problems.append("missing or non-finite losses")
    elif len(held_out) < 2 or not held_out[-1] < held_out[0]:
        problems.append("the held-out loss did not fall")
    if not (out / "adapter" / "adapter_model.safetensors").is_file():
        problems.append("no adapter/adapter_model.safetensors")
    print("ok" if not problems else "FAILED: " + "; ".join(problems), flush=True)
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU processes (gloo): checks the script only")
    parser.add_argument("--nproc", type=int, help="processes (default: min(2, GPUs); 2 with --cpu)")
    args = parser.parse_args()
    import torch
    import torch.distributed as dist

    if args.cpu:
        device, processes, precision = "cpu", args.nproc or 2, "bf16"
    else:
        if not torch.cuda.is_available():
            print(f"skipped: no CUDA (torch {torch.__version__}, CUDA build {torch.version.cuda})")
            return 0
        gpus = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
        print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} GPU(s): {', '.join(names)}")
        if not (dist.is_available() and dist.is_nccl_available()):
            print("FAILED: this torch build has no NCCL; FSDP on GPUs needs it")
            return 1
        print(f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))} available")
        device, processes = "cuda", args.nproc or min(2, gpus)
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if precision == "fp32":
            print("note: this GPU has no bf16; running with --precision fp32 --compute_dtype fp32")
    dtype_flags = [] if precision == "bf16" else ["--compute_dtype", "fp32"]
    with tempfile.TemporaryDirectory(prefix="lorakit-fsdp-check-") as temp:
        folder = Path(temp)
        save_tiny_model(folder / "model")
        write_records(folder / "train.jsonl", 32)
        write_records(folder / "eval.jsonl", 8, offset=100)
        runs = {"base": [], "qlora": ["--load_in_4bit"]}
        if device == "cuda":  # parameter shards in host memory: only meaningful (and allowed) on GPUs
            runs["offload"] = ["--fsdp_cpu_offload"]
        results = {
            name: run(name, folder, processes, device, precision, [*extra, *dtype_flags])
            for name, extra in runs.items()
        }
    print("\n" + "\n".join(f"{name}: {'ok' if good else 'FAILED'}" for name, good in results.items()))
    print(f"({processes} process(es), device {device}, precision {precision})")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
