"""``lorakit generate``: stream a completion from a base model + adapter (or a merged model).

The prompt goes through the tokenizer's chat template unless ``--raw``; ``--temperature 0`` is greedy.
With ``--output_dir`` the prompt and completion are also written to ``DIR/generate.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorakit.cli.options import (
    add_command,
    add_device_options,
    add_option,
)
from lorakit.cli.threads import pin_threads


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and chat: model, adapter, device, dtype, sampling and output folder."""
    add_option(parser, "model", default=None, help="base or merged model (default: adapter's base / SmolLM2)")
    add_option(
        parser, "adapter", default=None, metavar="DIR", help="adapter folder to apply on the base model"
    )
    add_device_options(parser)
    add_option(
        parser, "max_new_tokens", type=int, metavar="N", default=128, help="tokens to generate per reply"
    )
    add_option(parser, "temperature", type=float, metavar="X", default=0.7, help="0 = greedy decoding")
    add_option(parser, "top_p", type=float, metavar="X", default=0.9, help="nucleus sampling mass")
    add_option(
        parser, "top_k", type=int, metavar="N", default=50, help="sample among the k most likely tokens"
    )
    add_option(parser, "repetition_penalty", type=float, metavar="X", default=1.0, help="1 = off")
    add_option(parser, "seed", type=int, metavar="N", default=None, help="seed for sampling")
    add_option(parser, "system", default=None, metavar="TEXT", help="system message for the chat template")
    add_option(
        parser, "output_dir", default=None, metavar="DIR", help="also write the text to a JSON file in DIR"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "generate", "generate text with a model + adapter (streams tokens)", __doc__
    )
    parser.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read from stdin)")
    add_option(parser, "raw", action="store_true", help="do not apply the chat template")
    add_model_options(parser)
    parser.set_defaults(func=run)


def load(args: argparse.Namespace):
    """``(model, tokenizer)`` or None after printing an error; pins CPU threads first (see cli.threads)."""
    from lorakit.models import ModelLoadError
    from lorakit.train.inference import load_for_inference

    pin_threads()
    try:
        return load_for_inference(args.model, args.adapter, device=args.device, dtype=args.precision)
    except (FileNotFoundError, ValueError, OSError, ModelLoadError) as error:
        print(f"lorakit {args.command}: error: {error}", file=sys.stderr)
        return None


def seed_sampling(seed: int | None) -> None:
    if seed is not None:
        import torch

        torch.manual_seed(seed)


def stream_reply(model, tokenizer, text: str, args: argparse.Namespace) -> str:
    """Generate from ``text`` while printing tokens as they come; returns the new text."""
    from transformers import TextStreamer

    from lorakit.train.samples import generate_text

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate_text(
        model,
        tokenizer,
        text,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        streamer=streamer,
    )


def run(args: argparse.Namespace) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        print("lorakit generate: error: empty prompt; pass it as an argument or on stdin.", file=sys.stderr)
        return 2
    loaded = load(args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    seed_sampling(args.seed)
    from lorakit.train.samples import render_prompt

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    completion = stream_reply(
        model, tokenizer, prompt if args.raw else render_prompt(tokenizer, messages), args
    )
    if args.output_dir:
        from lorakit.train.checkpoint import write_json

        write_json(
            Path(args.output_dir) / "generate.json", {"prompt": prompt, "completion": completion}, mkdir=True
        )
    return 0
