"""One flag vocabulary for every sub-command: each option under its dash and underscore spellings.

The canonical names are the training config's keys (``--output_dir``, ``--precision``,
``--max_seq_length``, ...); :data:`VOCABULARY` lists the other names people type for the same thing
(``--out``, ``--dtype``, ``--max_length``, ...). :func:`add_option` registers an option under every
spelling of its canonical name and aliases, so ``--max-seq-length``, ``--max_seq_length``,
``--max-length`` and ``--max_length`` all set ``args.max_seq_length``. ``lorakit train`` reaches the same
vocabulary through the config's key normalisation plus :data:`TRAIN_ALIASES`, which is derived from
:data:`VOCABULARY` (every alias whose canonical name is a config key).

Help pages list the underscore spellings only (:class:`HelpFormatter`); the dash spellings are noted
in :data:`SPELLING_NOTE`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator
from itertools import takewhile
from typing import Any

from lorakit.train.config import FIELD_NAMES

# canonical name -> other names accepted for it (each also with dashes)
VOCABULARY: dict[str, tuple[str, ...]] = {
    "model": ("base_model", "model_name_or_path"),
    "adapter": ("adapter_dir", "adapter_path"),
    "output_dir": ("out", "output"),
    "precision": ("dtype",),
    "dataset": ("data",),
    "dataset_format": ("format",),
    "max_seq_length": ("max_length",),
    "micro_batch_size": ("batch_size",),
    "max_new_tokens": ("sample_max_new_tokens",),
}

# ``lorakit train`` takes every config key as a flag (and the config's own short names, ALIASES); every
# VOCABULARY alias of a config key maps onto it too, derived here so that the two never drift apart.
TRAIN_ALIASES: dict[str, str] = {
    alias: canonical
    for canonical, aliases in VOCABULARY.items()
    if canonical in FIELD_NAMES
    for alias in aliases
}

SPELLING_NOTE = (
    "Every option also works with dashes instead of underscores (--max-seq-length = --max_seq_length)."
)


def spellings(*names: str) -> list[str]:
    """``--name`` for every name, with underscores and with dashes, in order and without repeats."""
    flags: list[str] = []
    for name in names:
        for variant in (name.replace("-", "_"), name.replace("_", "-")):
            flag = f"--{variant}"
            if flag not in flags:
                flags.append(flag)
    return flags


def add_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, *aliases: str, **kwargs: Any
) -> argparse.Action:
    """``parser.add_argument`` under every spelling of ``name``, its :data:`VOCABULARY` aliases and ``aliases``.

    The destination is the canonical underscore name (``args.output_dir`` for ``--out``) unless ``dest``
    is given. Short options (``-r``) can be passed among ``aliases`` with their leading dash.
    """
    short = [alias for alias in aliases if alias.startswith("-")]
    long_names = [alias for alias in aliases if not alias.startswith("-")]
    kwargs.setdefault("dest", name.replace("-", "_"))
    flags = spellings(name, *VOCABULARY.get(name.replace("-", "_"), ()), *long_names)
    return parser.add_argument(*short, *flags, **kwargs)


def add_command(subparsers, name: str, help: str, doc: str | None) -> argparse.ArgumentParser:
    """A sub-command parser whose description is the module docstring ``doc`` and whose epilog is the
    spelling note, as every model command shows them."""
    return subparsers.add_parser(
        name,
        help=help,
        description=describe(doc),
        epilog=SPELLING_NOTE,
        formatter_class=RawDescriptionHelpFormatter,
    )


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--precision`` (the dtype weights are loaded in), as eval, generate and chat take them."""
    add_option(parser, "device", default="auto", metavar="DEVICE", help="cpu | cuda | auto")
    add_option(
        parser,
        "precision",
        default="fp32",
        choices=("fp32", "bf16", "fp16"),
        help="weight dtype when loading",
    )


def conflicting_spellings(
    parser: argparse.ArgumentParser, tokens: list[str], canonical: Callable[[str], str] = str
) -> str | None:
    """The error for one option given under two spellings with different values, else None.

    ``--r 8 --lora_r 16`` (an alias and its name, or ``--out`` and ``--output_dir``) would otherwise resolve
    silently by order. ``canonical`` maps a flag as typed to the flag ``parser`` knows (``--r`` ->
    ``--lora_r``). The same value twice passes, and so does one spelling repeated: the last wins, as usual.
    """
    seen: dict[str, tuple[str, list[str]]] = {}
    for flag, dest, values in _occurrences(parser, tokens, canonical):
        if dest in seen:
            first, first_values = seen[dest]
            if _spelling(first) != _spelling(flag) and _values(first_values) != _values(values):
                return (
                    f"{first} {' '.join(first_values)} and {flag} {' '.join(values)} both set '{dest}'; "
                    "give it once."
                )
        seen[dest] = (flag, values)
    return None


_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # what argparse takes as a value, not an option


def _occurrences(
    parser: argparse.ArgumentParser, tokens: list[str], canonical: Callable[[str], str]
) -> Iterator[tuple[str, str, list[str]]]:
    """``(flag as typed, dest, values)`` for each value-taking option of ``parser`` in ``tokens``."""
    for index, token in enumerate(tokens):
        if token == "--":
            return
        name, equals, value = token.partition("=")
        action = parser._option_string_actions.get(canonical(name)) if token.startswith("--") else None
        if action is None or action.nargs == 0:
            continue
        if equals:
            yield name, action.dest, [value]
            continue
        rest = tokens[index + 1 :]
        following = list(takewhile(lambda t: not t.startswith("-") or bool(_NEGATIVE_NUMBER.match(t)), rest))
        count = len(following) if action.nargs in ("+", "*") else min(len(following), 1)
        yield name, action.dest, following[:count]


def _spelling(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")  # --lora-r and --lora_r are one spelling


def _values(values: list[str]) -> list[Any]:
    """Values compared as numbers where they are numbers (``1e-3`` equals ``0.001``)."""
    result: list[Any] = []
    for value in values:
        try:
            result.append(float(value))
        except ValueError:
            result.append(value.strip())
    return result


class HelpFormatter(argparse.HelpFormatter):
    """Lists each option once per name (underscore spelling), not once per spelling."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flags = ", ".join(flag for flag in action.option_strings if _shown(flag, action.option_strings))
        if action.nargs == 0:
            return flags
        return f"{flags} {self._format_args(action, self._get_default_metavar_for_optional(action))}"


def _shown(flag: str, flags: list[str]) -> bool:
    """A dash spelling is hidden when its underscore twin is also an option string."""
    body = flag.lstrip("-")
    twin = flag[: len(flag) - len(body)] + body.replace("-", "_")
    return twin == flag or twin not in flags


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks (``lorakit train``)."""


def describe(doc: str | None) -> str:
    """A module docstring as a help page description: reST ``literal`` quotes dropped."""
    return (doc or "").replace("``", "").strip()


def help_text(text: str) -> str:
    """``text`` safe for argparse help strings, which are %-formatted (``10%`` -> ``10%%``)."""
    return text.replace("%", "%%")
