"""The configs under examples/ load, and examples/config.yaml trains for the epochs its comment says."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.train.config import TrainConfig, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
CONFIGS = sorted(EXAMPLES.rglob("*.yaml")) + sorted(EXAMPLES.rglob("*.yml"))


def test_there_are_example_configs() -> None:
    assert EXAMPLES / "config.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), TrainConfig)


def test_example_trains_for_num_epochs_not_the_default_step_cap(capsys) -> None:
    config = load_config(EXAMPLES / "config.yaml")
    assert TrainConfig().max_steps is not None  # the default caps the run; the example must lift the cap
    assert config.max_steps is None and config.num_epochs == 3
    assert main(["train", str(EXAMPLES / "config.yaml"), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: null\n" in printed and "num_epochs: 3.0\n" in printed
