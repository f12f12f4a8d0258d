"""Every help page renders: ``lorakit --help`` and ``--help`` / ``-h`` of every sub-command (issue 11)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorakit.cli import SUBCOMMAND_MODULES, main


def _help_page(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    assert captured.err == ""
    return captured.out


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", SUBCOMMAND_MODULES)
def test_every_subcommand_help_renders(command: str, flag: str, capsys) -> None:
    page = _help_page([command, flag], capsys)
    assert page.startswith(f"usage: lorakit {command}")
    assert "%%" not in page  # a help string escaped twice, or a description escaped at all
    assert "%(" not in page  # an unexpanded argparse placeholder


def test_top_level_help_lists_every_subcommand(capsys) -> None:
    page = _help_page(["--help"], capsys)
    assert "%%" not in page
    listed = {line.split()[0] for line in page.splitlines() if line.startswith("    ") and line.strip()}
    assert set(SUBCOMMAND_MODULES) <= listed


def test_percent_signs_survive_in_help_text(capsys) -> None:
    assert "(~10% faster)" in " ".join(_help_page(["train", "--help"], capsys).split())
    assert "holding 90% / 99% of" in " ".join(_help_page(["inspect", "--help"], capsys).split())


def test_train_help_as_a_real_process() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "-h"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr and "--max_seq_length" in completed.stdout
