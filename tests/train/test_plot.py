"""loss.png: EMA smoothing checked by hand, and the figure drawn from synthetic metrics records."""

from __future__ import annotations

import math

import matplotlib.image
import pytest

from lorakit.train.plot import ema, plot_loss_curves, smoothing_weight


def test_ema_by_hand() -> None:
    # weight 0.5: m = 0.5 m + 0.5 x from m = 0, divided by 1 - 0.5^(t+1)
    #   t=0: m = 2,              2 / 0.5    = 4
    #   t=1: m = 1 + 4 = 5,      5 / 0.75   = 6.6667
    #   t=2: m = 2.5 + 1 = 3.5,  3.5 / 0.875 = 4
    assert ema([4.0, 8.0, 2.0], 0.5) == pytest.approx([4.0, 20 / 3, 4.0])
    # the same values as explicit weighted means: sum w^(t-i) x_i / sum w^(t-i)
    assert ema([4.0, 8.0, 2.0], 0.5)[2] == pytest.approx((0.25 * 4 + 0.5 * 8 + 1 * 2) / 1.75)


def test_ema_edge_cases() -> None:
    assert ema([], 0.9) == []
    assert ema([3.0, 1.0], 0.0) == [3.0, 1.0]  # no smoothing
    assert ema([2.5] * 5, 0.9) == pytest.approx([2.5] * 5)  # bias correction: a constant stays constant
    with pytest.raises(ValueError):
        ema([1.0], 1.0)


@pytest.mark.parametrize(("points", "weight"), [(10, 0.8), (40, 0.8), (400, 0.95), (10_000, 0.99)])
def test_smoothing_weight(points: int, weight: float) -> None:
    assert smoothing_weight(points) == pytest.approx(weight)


def _records(steps: int = 40, eval_every: int = 5, with_lr: bool = True) -> list[dict]:
    records = []
    for step in range(0, steps + 1, eval_every):
        records.append(
            {"step": step, "eval_loss": 3.0 * math.exp(-step / 15), "eval_ppl": 1.0, "eval_tokens": 9}
        )
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": step / 80, "loss": 3.0 * math.exp(-step / 15) + 0.2 * (-1) ** step}
        if with_lr:
            record["lr"] = 1e-3 * min(step / 4, 1.0)
        records.append(record)
    return records


@pytest.mark.parametrize("with_lr", [True, False])
def test_plot_writes_a_png(tmp_path, with_lr: bool) -> None:
    path = plot_loss_curves(_records(with_lr=with_lr), tmp_path / "sub" / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width == 700 and height == (550 if with_lr else 400)  # the lr panel makes the figure taller


def test_plot_of_no_records_still_writes_a_file(tmp_path) -> None:
    assert plot_loss_curves([], tmp_path / "empty.png").stat().st_size > 0
