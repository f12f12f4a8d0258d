"""The ``lorakit`` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Options share one vocabulary, each under its dash and underscore spellings (:mod:`lorakit.cli.options`).
Ctrl-C anywhere ends a command with exit code 130 and a one-line message instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order shown in ``lorakit --help``.
SUBCOMMAND_MODULES = (
    "train",
    "eval",
    "merge",
    "generate",
    "chat",
    "factorize",
    "inspect",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning toolkit: train, merge, generate, evaluate, inspect.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"lorakit.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"lorakit.cli.{name}":
                continue  # sub-command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nlorakit {args.command}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
