"""The loss-curve figure: train loss per logged step and held-out loss per evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(records: list[dict[str, Any]], path: Path, title: str = "lorakit training") -> Path:
    """Draw train and eval loss against the optimizer step into the PNG file ``path``."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1.2, alpha=0.8)
    if evals:
        axis.plot(*zip(*evals), "o-", label="held-out loss", linewidth=1.5)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy per trained token")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if train or evals:
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
