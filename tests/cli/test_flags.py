"""One flag vocabulary: every option under its dash and underscore spellings and its shared aliases."""

from __future__ import annotations

import argparse

import pytest

from lorakit.cli import build_parser, main
from lorakit.cli.options import VOCABULARY, add_option, spellings
from lorakit.train.config import ALIASES, FIELD_NAMES


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_spellings_and_add_option() -> None:
    assert spellings("max_seq_length", "max-length") == [
        "--max_seq_length",
        "--max-seq-length",
        "--max_length",
        "--max-length",
    ]
    assert spellings("json") == ["--json"]
    parser = argparse.ArgumentParser()
    add_option(parser, "output_dir", "-o")
    for flag in ("--output_dir", "--output-dir", "--out", "--output", "-o"):
        assert parser.parse_args([flag, "x"]).output_dir == "x"


@pytest.mark.parametrize("command", ["eval", "merge", "generate", "chat", "factorize", "inspect"])
def test_every_long_option_has_both_spellings(command: str) -> None:
    parser = _subparsers()[command]
    flags = {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}
    for flag in flags:
        body = flag[2:]
        assert {f"--{body.replace('-', '_')}", f"--{body.replace('_', '-')}"} <= flags, flag


@pytest.mark.parametrize("command", ["eval", "merge", "generate", "chat", "factorize", "inspect"])
def test_shared_names_come_with_all_their_aliases(command: str) -> None:
    parser = _subparsers()[command]
    by_dest = {a.dest: set(a.option_strings) for a in parser._actions if a.option_strings}
    for canonical, aliases in VOCABULARY.items():
        if canonical in by_dest:
            assert set(spellings(canonical, *aliases)) <= by_dest[canonical], (command, canonical)
        for alias in aliases:  # an alias never names something else
            for flag in spellings(alias):
                owners = [dest for dest, flags in by_dest.items() if flag in flags]
                assert owners in ([], [canonical]), (command, flag, owners)


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["eval", "--max-seq-length", "7"], "max_seq_length", 7),
        (["eval", "--max_seq_length", "7"], "max_seq_length", 7),
        (["eval", "--max_length", "7"], "max_seq_length", 7),
        (["eval", "--batch-size", "3"], "micro_batch_size", 3),
        (["eval", "--micro_batch_size", "3"], "micro_batch_size", 3),
        (["eval", "--format", "text"], "dataset_format", "text"),
        (["eval", "--dataset_format", "text"], "dataset_format", "text"),
        (["eval", "--train-on-prompt"], "train_on_prompt", True),
        (["eval", "--out", "o"], "output_dir", "o"),
        (["merge", "--adapter", "a", "--out", "o"], "output_dir", "o"),
        (["merge", "--adapter", "a", "--output_dir", "o"], "output_dir", "o"),
        (["merge", "--adapter-dir", "a", "--output-dir", "o"], "adapter", "a"),
        (["merge", "--adapter", "a", "--out", "o", "--dtype", "bf16"], "precision", "bf16"),
        (["merge", "--adapter", "a", "--out", "o", "--precision", "fp16"], "precision", "fp16"),
        (["generate", "--max_new_tokens", "5"], "max_new_tokens", 5),
        (["generate", "--max-new-tokens", "5"], "max_new_tokens", 5),
        (["generate", "--dtype", "bf16"], "precision", "bf16"),
        (["generate", "--top_p", "0.5"], "top_p", 0.5),
        (["chat", "--adapter_dir", "a"], "adapter", "a"),
        (["chat", "--repetition_penalty", "1.2"], "repetition_penalty", 1.2),
        (["factorize", "--log_every", "9"], "log_every", 9),
        (["factorize", "--learning-rate", "0.5"], "lr", 0.5),
        (["inspect", "a", "--show_singular_values", "2"], "show_singular_values", 2),
    ],
)
def test_spellings_parse_to_the_same_option(argv: list[str], dest: str, value: object) -> None:
    assert getattr(_parse(argv), dest) == value


def test_merge_defaults_and_required_output(capsys) -> None:
    args = _parse(["merge", "--adapter", "a", "--out", "o"])
    assert args.precision == "auto" and args.model is None and not args.force
    with pytest.raises(SystemExit):
        _parse(["merge", "--adapter", "a"])
    assert "--output_dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-seq-length", "77"], "max_seq_length: 77\n"),
        (["--max_length", "77"], "max_seq_length: 77\n"),
        (["--out", "somewhere"], "output_dir: somewhere\n"),
        (["--output-dir", "somewhere"], "output_dir: somewhere\n"),
        (["--dtype", "bf16"], "precision: bf16\n"),
        (["--format=text"], "dataset_format: text\n"),
        (["--batch-size", "3"], "micro_batch_size: 3\n"),
    ],
)
def test_train_accepts_the_shared_vocabulary(flags: list[str], expected: str, capsys) -> None:
    assert main(["train", *flags, "--print-config"]) == 0
    assert expected in capsys.readouterr().out


# A valid value for each config key that has shared aliases (a new one fails below until it is added).
TRAIN_VALUES = {
    "model": "some/model",
    "output_dir": "somewhere",
    "precision": "bf16",
    "dataset": "data.jsonl",
    "dataset_format": "text",
    "max_seq_length": "77",
    "micro_batch_size": "3",
}
TRAIN_VOCABULARY = [
    (alias, canonical)
    for canonical, aliases in VOCABULARY.items()
    if canonical in FIELD_NAMES
    for alias in aliases
]


@pytest.mark.parametrize(("alias", "canonical"), TRAIN_VOCABULARY)
def test_train_accepts_every_shared_alias_of_a_config_key(alias: str, canonical: str, capsys) -> None:
    """Derived from VOCABULARY itself, so an alias added there for another sub-command is checked here."""
    value = TRAIN_VALUES[canonical]
    assert ALIASES.get(alias, canonical) == canonical  # no config short name means something else
    for flag in spellings(alias):
        assert main(["train", flag, value, "--print-config"]) == 0, flag
        assert f"{canonical}: {value}\n" in capsys.readouterr().out, flag
