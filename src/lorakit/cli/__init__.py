"""The ``lorakit`` command line: one sub-command per module in this package.

Each sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` to a callable taking the parsed ``argparse.Namespace`` and returning an exit code.
Options share one vocabulary, each under its dash and underscore spellings (:mod:`lorakit.cli.options`).
Ctrl-C anywhere ends a command with exit code 130 and a one-line message instead of a traceback.

Errors the user can fix end a command with ``lorakit <command>: error: <message>`` on stderr and exit code
2 (a configuration error) or 1 (anything else), without a traceback (:func:`is_user_error`); any other
exception is a bug in lorakit and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import linecache
import os
import sys
from pathlib import Path

PACKAGE_DIR = os.path.join(Path(__file__).resolve().parent.parent, "")  # with its trailing separator
# Built-in exception types whose messages lorakit writes for users when it raises them itself.
USER_FACING_BUILTINS = (ValueError, TypeError, OSError, NotImplementedError)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

# Order is the order shown in ``lorakit --help``.
SUBCOMMAND_MODULES = (
    "train",
    "eval",
    "merge",
    "export",
    "generate",
    "chat",
    "factorize",
    "inspect",
    "serve",
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
    except Exception as error:
        if not is_user_error(error):
            raise
        print(f"lorakit {args.command}: error: {error}", file=sys.stderr)
        return 2 if _is_config_error(error) else 1


def is_user_error(error: BaseException) -> bool:
    """Whether ``error`` is a problem the user can fix (one line) rather than a bug in lorakit (traceback).

    User errors: an instance of lorakit's own exception classes (``ConfigError``, ``DatasetError``,
    ``ModelLoadError``, ``CheckpointError``, ...); an ``OSError`` naming a file (a missing or unreadable path)
    or a full disk; a ``ValueError``, ``TypeError``, ``OSError`` or ``NotImplementedError`` with a message that
    a ``raise`` statement in lorakit's own code raised (re-raised ones included).
    """
    if not isinstance(error, Exception):
        return False
    if type(error).__module__.startswith("lorakit."):
        return True
    if isinstance(error, OSError) and (error.filename is not None or error.errno in DISK_FULL):
        return True
    return isinstance(error, USER_FACING_BUILTINS) and bool(str(error)) and _raised_by_lorakit(error)


def _raised_by_lorakit(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is a ``raise`` statement in lorakit's code."""
    frame = error.__traceback__
    if frame is None:
        return False
    while frame.tb_next is not None:
        frame = frame.tb_next
    filename = frame.tb_frame.f_code.co_filename
    if not str(Path(filename).resolve()).startswith(PACKAGE_DIR):
        return False
    return linecache.getline(filename, frame.tb_lineno).lstrip().startswith("raise ")


def _is_config_error(error: BaseException) -> bool:
    config = sys.modules.get("lorakit.train.config")  # a ConfigError can only come from an imported module
    return config is not None and isinstance(error, config.ConfigError)


if __name__ == "__main__":
    raise SystemExit(main())
