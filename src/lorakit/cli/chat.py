"""``lorakit chat``: an interactive conversation with a model + adapter, streamed token by token.

Type a message and press Enter; ``/reset`` forgets the conversation, ``/exit`` quits. Line editing and
history (arrow keys) come from Python's ``readline`` module where it exists (not on plain Windows).

Interrupts: Ctrl-C while a reply is being generated stops that reply and returns to the prompt (the
unfinished exchange is dropped from the conversation). At the prompt, ``/exit`` and Ctrl-D end the chat
with exit code 0, and Ctrl-C ends it with exit code 130 (128 + SIGINT, the shell's convention for a
command stopped by Ctrl-C). With ``--output_dir`` the conversation is written to ``DIR/chat.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from lorakit.cli.generate import add_model_options, load, seed_sampling, stream_reply
from lorakit.cli.options import add_command

Message = dict[str, str]
EXIT_COMMANDS = ("/exit", "/quit")
INTERRUPTED = 130


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "chat", "chat with a model + adapter in the terminal", __doc__)
    add_model_options(parser)
    parser.set_defaults(func=run)


def enable_line_editing() -> bool:
    """Import ``readline`` (which gives ``input()`` arrow keys and history); False where it is missing."""
    try:
        import readline  # noqa: F401
    except ImportError:
        return False
    return True


def chat_loop(
    respond: Callable[[list[Message]], str],
    messages: list[Message],
    *,
    read: Callable[[str], str] | None = None,
    err: TextIO | None = None,
) -> int:
    """Read user lines, append them and ``respond(messages)``'s replies to ``messages``; returns the exit code.

    ``messages`` starts with the system message(s), if any, which ``/reset`` keeps. ``read`` defaults to
    ``input`` (looked up at call time) and ``err`` to ``sys.stderr``.
    """
    read = read or input
    err = err or sys.stderr
    kept = len(messages)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:  # Ctrl-D
            print(file=err)
            return 0
        except KeyboardInterrupt:
            print(file=err)
            return INTERRUPTED
        if line in EXIT_COMMANDS:
            return 0
        if line == "/reset":
            del messages[kept:]
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = respond(messages)
        except KeyboardInterrupt:
            messages.pop()
            print("\n[reply interrupted; not kept in the conversation]", file=err)
            continue
        messages.append({"role": "assistant", "content": reply.strip()})


def run(args: argparse.Namespace) -> int:
    loaded = load(args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    seed_sampling(args.seed)
    from lorakit.train.samples import render_prompt

    def respond(messages: list[Message]) -> str:
        print("assistant> ", end="", flush=True)
        return stream_reply(model, tokenizer, render_prompt(tokenizer, messages), args)

    enable_line_editing()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("lorakit chat: /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    code = chat_loop(respond, messages)
    if args.output_dir:
        from lorakit.train.checkpoint import write_json

        write_json(Path(args.output_dir) / "chat.json", {"messages": messages}, mkdir=True)
    return code
