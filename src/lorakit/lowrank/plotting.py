"""Figures for the low-rank tools, drawn with Matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def plot_loss_curve(
    loss_history: Sequence[float], path: str | Path, svd_optimum: float | None = None
) -> Path:
    """Write the loss-per-epoch curve (as in the seed example) to ``path``; returns the path.

    With ``svd_optimum`` a dashed line marks the Eckart-Young optimum descent can at best reach.
    """
    figure = _new_figure((8, 6))
    axes = figure.add_subplot()
    axes.plot(np.asarray(loss_history), label="loss")
    if svd_optimum is not None:
        axes.axhline(svd_optimum, color="tab:red", linestyle="--", label=f"SVD optimum ({svd_optimum:.4f})")
    axes.set_xlabel("Epochs")
    axes.set_ylabel("Loss")
    axes.set_title("Loss Curve")
    axes.legend()
    axes.grid(True)
    figure.savefig(path)
    return Path(path)


def plot_spectra(
    spectra: dict[str, np.ndarray], path: str | Path, thresholds: Sequence[float] = (0.9, 0.99)
) -> Path:
    """Write singular values (left) and cumulative energy (right) of each layer's update to ``path``."""
    figure = _new_figure((12, 5))
    values_axes, energy_axes = figure.subplots(1, 2)
    show_legend = len(spectra) <= 12
    for name, sigma in spectra.items():
        sigma = np.asarray(sigma, dtype=np.float64)
        index = np.arange(1, sigma.size + 1)
        values_axes.plot(index, sigma, marker=".", label=name)
        total = float(np.sum(sigma**2))
        if total > 0:
            energy_axes.plot(index, np.cumsum(sigma**2) / total, marker=".", label=name)
    for fraction in thresholds:
        energy_axes.axhline(fraction, color="grey", linestyle="--", linewidth=0.8)
    values_axes.set(xlabel="index i", ylabel="singular value", title="Singular values of scaling * B @ A")
    if any(np.any(np.asarray(s) > 0) for s in spectra.values()):
        values_axes.set_yscale("log")
    energy_axes.set(xlabel="k", ylabel="share of ||delta||_F^2", title="Cumulative energy", ylim=(0, 1.02))
    for axes in (values_axes, energy_axes):
        axes.grid(True)
    if show_legend:
        energy_axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def plot_similarity(grids: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write ``phi(i, i)`` against ``i`` for each layer's similarity grid (LoRA section 7.2) to ``path``."""
    figure = _new_figure((8, 5))
    axes = figure.add_subplot()
    for name, grid in grids.items():
        diagonal = np.diagonal(np.asarray(grid))
        axes.plot(np.arange(1, diagonal.size + 1), diagonal, marker=".", label=name)
    axes.set(xlabel="i (top-i directions of both adapters)", ylabel="phi(i, i)", ylim=(-0.02, 1.02))
    axes.set_title("Subspace similarity ||U_i^T V_i||_F^2 / i")
    axes.grid(True)
    if 0 < len(grids) <= 12:
        axes.legend(fontsize="small")
    figure.savefig(path)
    return Path(path)
