"""``lorakit generate``: stream a completion from a base model + adapter (or a merged model).

The prompt goes through the tokenizer's chat template unless ``--raw``; ``--temperature 0`` is greedy.
"""

from __future__ import annotations

import argparse
import sys


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and chat: model, adapter, device and sampling."""
    parser.add_argument(
        "--model", default=None, help="base or merged model (default: adapter's base / SmolLM2)"
    )
    parser.add_argument("--adapter", default=None, help="adapter folder to apply on the base model")
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--system", default=None, help="system message for the chat template")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text with a model + adapter (streams tokens)")
    parser.add_argument("prompt", nargs="?", default=None, help="prompt text (default: read from stdin)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_model_options(parser)
    parser.set_defaults(func=run)


def load(args: argparse.Namespace):
    """``(model, tokenizer)`` or None after printing an error."""
    from lorakit.models import ModelLoadError
    from lorakit.train.inference import load_for_inference

    try:
        return load_for_inference(args.model, args.adapter, device=args.device, dtype=args.dtype)
    except (FileNotFoundError, ValueError, OSError, ModelLoadError) as error:
        print(f"lorakit {args.command}: error: {error}", file=sys.stderr)
        return None


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
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    from lorakit.train.samples import render_prompt

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    stream_reply(model, tokenizer, prompt if args.raw else render_prompt(tokenizer, messages), args)
    return 0
