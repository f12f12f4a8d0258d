"""The run figure ``loss.png``: losses against the optimizer step, and the learning-rate schedule below.

Top panel: the train loss of every logged step, faint, with its exponential moving average on top
(:func:`ema`), and the held-out loss of each evaluation as markers. Bottom panel (when the records carry
``lr``): the learning rate per step, i.e. warm-up and decay. Records are ``metrics.jsonl`` lines
(:mod:`lorakit.train.metrics`): train lines carry ``step``, ``loss``, ``lr``; eval lines ``step``, ``eval_loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average, as Adam's first moment (Kingma & Ba 2015, sec. 3):

    ``m_t = weight * m_(t-1) + (1 - weight) * x_t`` with ``m_(-1) = 0``, reported as ``m_t / (1 - weight^(t+1))``,
    i.e. the mean of ``x_0 .. x_t`` weighted by ``weight^(t-i)``; the first value is ``x_0`` itself.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"weight must be in [0, 1), got {weight}.")
    smoothed, moment = [], 0.0
    for t, value in enumerate(values):
        moment = weight * moment + (1.0 - weight) * value
        smoothed.append(moment / (1.0 - weight ** (t + 1)))
    return smoothed


def smoothing_weight(points: int) -> float:
    """EMA weight whose effective window ``1 / (1 - weight)`` is 5% of the points, at least 5, at most 100."""
    window = min(max(points / 20, 5.0), 100.0)
    return 1.0 - 1.0 / window


def _pairs(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    found = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [step for step, _ in found], [value for _, value in found]


def _draw_losses(axis: Any, records: list[dict[str, Any]]) -> None:
    steps, losses = _pairs(records, "loss")
    if steps:
        axis.plot(steps, losses, color="tab:blue", linewidth=0.8, alpha=0.3, label="train loss")
        weight = smoothing_weight(len(losses))
        axis.plot(
            steps, ema(losses, weight), color="tab:blue", linewidth=1.8, label=f"train loss, EMA {weight:.2f}"
        )
    eval_steps, eval_losses = _pairs(records, "eval_loss")
    if eval_steps:
        axis.plot(
            eval_steps,
            eval_losses,
            "o-",
            color="tab:orange",
            markersize=5,
            linewidth=1.2,
            label="held-out loss",
        )
    axis.set_ylabel("cross-entropy per trained token")
    axis.grid(alpha=0.3)
    if steps or eval_steps:
        axis.legend()


def _draw_learning_rate(axis: Any, steps: list[float], rates: list[float]) -> None:
    axis.plot(steps, rates, color="tab:green", linewidth=1.5)
    axis.set_ylabel("learning rate")
    axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axis.grid(alpha=0.3)


def plot_loss_curves(records: list[dict[str, Any]], path: Path, title: str = "lorakit training") -> Path:
    """Draw the losses (and the learning rate, if recorded) against the optimizer step into the PNG ``path``."""
    lr_steps, rates = _pairs(records, "lr")
    if rates:
        figure, (top, bottom) = plt.subplots(
            2, 1, figsize=(7, 5.5), dpi=100, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
        _draw_learning_rate(bottom, lr_steps, rates)
        bottom.set_xlabel("optimizer step")
    else:
        figure, top = plt.subplots(figsize=(7, 4), dpi=100)
        top.set_xlabel("optimizer step")
    _draw_losses(top, records)
    top.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
