"""``lorakit chat``: an interactive conversation with a model + adapter, streamed token by token.

Type a message and press Enter; ``/reset`` forgets the conversation, ``/exit`` (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import sys

from lorakit.cli.generate import add_model_options, load, stream_reply


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a model + adapter in the terminal")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    from lorakit.train.samples import render_prompt

    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("lorakit chat: /reset to start over, /exit to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        reply = stream_reply(model, tokenizer, render_prompt(tokenizer, messages), args)
        messages.append({"role": "assistant", "content": reply.strip()})
