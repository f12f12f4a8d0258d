"""``lorakit merge --adapter DIR --out DIR``: fold the adapter into the base weights.

The result is a plain transformers model folder (safetensors + config + tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and gives the logits of base + adapter:
``W' = W + (alpha / r) B A`` (LoRA, Hu et al. 2021, sec. 4.1: no extra inference latency).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="merge an adapter into its base model (transformers format)")
    parser.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + weights)")
    parser.add_argument("--out", required=True, help="output folder for the merged model")
    parser.add_argument("--model", default=None, help="base model (default: the adapter's recorded base)")
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="saved weight dtype"
    )
    parser.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from lorakit.models import ModelLoadError
    from lorakit.train.inference import DTYPES, load_for_inference

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(
            f"lorakit merge: error: {out} is not empty; choose another --out or pass --force.",
            file=sys.stderr,
        )
        return 1
    try:
        model, tokenizer = load_for_inference(args.model, args.adapter, device="cpu", dtype="fp32")
    except (FileNotFoundError, ValueError, OSError, ModelLoadError) as error:
        print(f"lorakit merge: error: {error}", file=sys.stderr)
        return 1
    try:
        merged = model.merge_and_unload()
    except ValueError as error:  # e.g. a bottleneck Adapter, which has no weight to merge into
        print(f"lorakit merge: error: {error}", file=sys.stderr)
        return 1
    if DTYPES[args.dtype] != torch.float32:
        merged = merged.to(DTYPES[args.dtype])
    if getattr(merged.config, "use_cache", None) is False:
        merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out}")
    return 0
