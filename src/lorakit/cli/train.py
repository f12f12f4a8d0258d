"""``lorakit train [config.yaml] [--key value ...]``: fine-tune an adapter (see docs/training.md).

Every config key is a flag; ``--lora.r 16``, ``--lora-r 16``, ``--lora_r 16`` and ``--r 16`` are the
same, and the other sub-commands' names work too (``--out`` = ``--output_dir``, ``--dtype`` =
``--precision``, ``--format`` = ``--dataset_format``, ``--base_model`` = ``--model_name_or_path`` =
``--model``). ``--print-config`` shows the resolved config as
YAML and exits. Under ``torchrun`` the same command trains data-parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any

from lorakit.cli.options import TRAIN_ALIASES, RawDescriptionHelpFormatter, conflicting_spellings, help_text
from lorakit.cli.threads import pin_threads
from lorakit.train.config import (
    FIELD_NAMES,
    ConfigError,
    TrainConfig,
    config_to_yaml,
    field_types,
    load_config,
    normalize_key,
    suggest_key,
)

PASSTHROUGH = {"--help", "-h", "--print-config", "--print_config", "--"}


class _TrainArgumentParser(argparse.ArgumentParser):
    """Accepts dotted/dashed spellings and turns unknown options into errors with a suggestion."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else args
        clash = conflicting_spellings(self, args, _normalize_token)  # --r 8 --lora_r 16
        if clash:
            self.error(clash)
        args = [_normalize_token(token) for token in args]
        parsed, extras = super().parse_known_args(args, namespace)
        for token in extras:
            if token.startswith("-"):
                self.error(f"unknown option '{token}'.{suggest_key(token.split('=', 1)[0])}")
            self.error(f"unexpected argument '{token}' (only one config file can be given)")
        return parsed, []


def _normalize_token(token: str) -> str:
    if not token.startswith("--") or token in PASSTHROUGH:
        return token
    name, equals, value = token.partition("=")
    key = normalize_key(name)
    key = TRAIN_ALIASES.get(key, key)
    return f"--{key}{equals}{value}" if key in FIELD_NAMES else token


def _type_name(hint: Any) -> str:
    """'bool', 'int', 'float', 'str' or 'list' for a field annotation (``X | None`` -> X)."""
    for candidate in (bool, int, float, str):
        if hint is candidate or candidate in typing.get_args(hint):
            return candidate.__name__
    return "list"


def _add_field_options(parser: argparse.ArgumentParser) -> None:
    types = field_types()
    for spec in dataclasses.fields(TrainConfig):
        # argparse %-formats help strings: "~10% faster" must reach it as "~10%% faster".
        text = help_text(f"{spec.metadata.get('help', '')} (default: {spec.default})")
        kind = _type_name(types[spec.name])
        kwargs: dict[str, Any] = dict(dest=spec.name, default=argparse.SUPPRESS, help=text)
        if kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif kind == "list":
            kwargs.update(nargs="+", metavar="NAME")
        else:
            kwargs.update(metavar=kind.upper())
        parser.add_argument(f"--{spec.name}", **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a LoRA adapter (no arguments: SmolLM2-135M on the bundled sample data)",
        description=__doc__,
        formatter_class=RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="lorakit train [config.yaml] [--key value ...] [--print-config]",
    )
    parser.__class__ = _TrainArgumentParser
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (flat key: value lines)")
    parser.add_argument(
        "--print-config", "--print_config", action="store_true", help="print the resolved config"
    )
    _add_field_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in FIELD_NAMES if hasattr(args, name)}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"lorakit train: error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    return _train(config)


def _train(config: TrainConfig) -> int:
    """Exit codes: 0 done; 2 a config error; 1 another error (message on stderr: data, model, checkpoint, output
    folder in use or unwritable, disk full, divergence); 143 / 130 stopped by SIGTERM / SIGINT (Ctrl-C)."""
    from lorakit.data import DatasetError
    from lorakit.models import ModelLoadError
    from lorakit.train.checkpoint import CheckpointError
    from lorakit.train.lock import OutputDirError
    from lorakit.train.loop import TrainingDiverged, train
    from lorakit.train.signals import TrainingAborted, TrainingInterrupted

    pin_threads()
    try:
        train(config)
    except ConfigError as error:
        print(f"lorakit train: error: {error}", file=sys.stderr)
        return 2
    except (
        DatasetError,
        CheckpointError,
        TrainingDiverged,
        OutputDirError,
        ModelLoadError,
        FileNotFoundError,
    ) as error:
        print(f"lorakit train: error: {error}", file=sys.stderr)
        return 1
    except (TrainingInterrupted, TrainingAborted) as stop:
        if os.environ.get("RANK", "0").strip() in ("", "0"):  # under torchrun: one message, not one per rank
            print(f"lorakit train: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0
