"""``lorakit merge --adapter DIR --output_dir DIR``: fold the adapter into the base weights.

The result is a plain transformers model folder (safetensors + config + tokenizer) that loads with
``AutoModelForCausalLM.from_pretrained`` and gives the logits of base + adapter:
``W' = W + (alpha / r) B A`` (LoRA, Hu et al. 2021, sec. 4.1: no extra inference latency).

The merge is computed in fp32 and the result saved in ``--precision``: by default (``auto``) the dtype
the base model's weights are stored in (a bf16 base gives a bf16 merged model), else fp32, bf16 or fp16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorakit.cli.options import add_command, add_option

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "merge", "merge an adapter into its base model (transformers format)", __doc__
    )
    add_option(
        parser, "adapter", required=True, metavar="DIR", help="adapter folder (adapter_config.json + weights)"
    )
    add_option(parser, "output_dir", required=True, metavar="DIR", help="output folder for the merged model")
    add_option(parser, "model", default=None, help="base model (default: the adapter's recorded base)")
    add_option(
        parser,
        "precision",
        default="auto",
        choices=PRECISIONS,
        help="saved weight dtype; auto = the dtype the base model is stored in (default: auto)",
    )
    add_option(parser, "force", action="store_true", help="write into a non-empty output folder")
    parser.set_defaults(func=run)


def saved_dtype(precision: str, base: str | None):
    """The torch dtype to save: ``precision``, or for ``auto`` the base weights' stored dtype."""
    from lorakit.models.loading import stored_dtype
    from lorakit.train.inference import DTYPES

    return stored_dtype(base) if precision == "auto" else DTYPES[precision]


def _output_problem(out: Path, force: bool) -> str | None:
    """Why the merged model cannot go to ``out`` (None: it can)."""
    if out.exists() and not out.is_dir():
        return f"{out} is a file, not a folder; choose a folder path for --output_dir."
    if out.is_dir() and any(out.iterdir()) and not force:
        return f"{out} is not empty; choose another --output_dir or pass --force."
    return None


def check_adapter_config(adapter: Path) -> None:
    """Raise ``ValueError`` naming ``adapter_config.json`` when it is not a readable JSON object.

    Checked before anything is loaded, so a corrupt file is reported as such (with its path) and not as a
    bare JSON or Unicode error from deep inside the loading code.
    """
    from lorakit.config import read_config_json

    path = adapter / "adapter_config.json"
    if path.is_file():  # else the loader says the folder is not an adapter (or fetches a Hub repository)
        read_config_json(path)


def run(args: argparse.Namespace) -> int:
    from lorakit.models import ModelLoadError
    from lorakit.train.inference import load_for_inference, resolve_base

    out = Path(args.output_dir)
    problem = _output_problem(out, args.force)
    if problem:
        print(f"lorakit merge: error: {problem}", file=sys.stderr)
        return 1
    try:
        check_adapter_config(Path(args.adapter))
        dtype = saved_dtype(args.precision, resolve_base(args.model, args.adapter))
        model, tokenizer = load_for_inference(args.model, args.adapter, device="cpu", dtype="fp32")
        merged = model.merge_and_unload()  # ValueError for e.g. a bottleneck Adapter: nothing to merge into
    except (FileNotFoundError, ValueError, OSError, ModelLoadError) as error:
        print(f"lorakit merge: error: {error}", file=sys.stderr)
        return 1
    merged = merged.to(dtype)
    if getattr(merged.config, "use_cache", None) is False:
        merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged model written to {out} ({str(dtype).removeprefix('torch.')})")
    return 0
