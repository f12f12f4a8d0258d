"""Shared fixtures: one tiny model folder and small JSONL datasets per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import qa_records, save_tiny_model, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-inputs")
    return {
        "model": save_tiny_model(root / "model"),
        "train": write_jsonl(root / "train.jsonl", qa_records(24)),
        "eval": write_jsonl(root / "eval.jsonl", qa_records(6, offset=100)),
    }
