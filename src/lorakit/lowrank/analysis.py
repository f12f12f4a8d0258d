"""Rank analysis of saved adapters: per-layer spectra and subspace similarity between two adapters.

``inspect_adapter`` reports, for every adapted layer, the singular values of its update
``delta = scaling * B @ A``, its energy ranks (how many singular values carry 90% / 99% of
``||delta||_F^2``), stable rank and Frobenius norm.

``compare_adapters`` measures how much two adapters' updates point the same way, layer by layer, with
the normalised subspace similarity of Hu et al. (2021, LoRA, section 7.2)
``phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j)`` between the top-i singular directions of one update and
the top-j of the other. The paper uses the right singular vectors of the ``A`` matrices (the input
space); here the directions are those of the update itself, by default its right singular vectors
(``side="input"``), or the left ones (``side="output"``). When ``B`` has full column rank, the span of
all input directions of ``B @ A`` is the row space of ``A``, so at full rank both definitions agree;
at smaller ``i`` the update's own directions are ordered by how much the update actually uses them.
Directions beyond an update's numerical rank are arbitrary and left out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lorakit.lowrank.adapter_files import Adapter, LayerUpdate, read_adapter
from lorakit.lowrank.spectrum import (
    ENERGY_THRESHOLDS,
    SpectrumStats,
    factored_svd,
    numerical_rank,
    spectrum_stats,
    subspace_similarity_grid,
)

SIDES = ("input", "output")


def natural_key(name: str) -> tuple:
    """Sort key that orders the numbers in a module name as numbers: ``layers.2`` before ``layers.10``.

    The name is split into alternating text and digit runs; text compares as text, digits as integers
    (e.g. ``model.layers.10.q_proj`` -> ``("model.layers.", 10, ".q_proj")``).
    """
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def natural_sorted(names) -> list[str]:
    """``names`` in :func:`natural_key` order."""
    return sorted(names, key=natural_key)


@dataclass
class LayerReport:
    """Spectrum of one adapted layer's update."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    scaling: float
    stats: SpectrumStats
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.shape),
            "rank": self.rank,
            "scaling": self.scaling,
            **self.stats.as_dict(),
            "notes": list(self.notes),
        }


@dataclass
class AdapterReport:
    """``inspect_adapter`` result: one :class:`LayerReport` per adapted layer."""

    path: str
    peft_type: str
    thresholds: tuple[float, ...]
    layers: list[LayerReport]
    ignored_keys: list[str]

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "peft_type": self.peft_type,
            "energy_thresholds": list(self.thresholds),
            "layers": [layer.as_dict() for layer in self.layers],
            "ignored_keys": list(self.ignored_keys),
        }


def layer_spectrum(layer: LayerUpdate, thresholds: tuple[float, ...] = ENERGY_THRESHOLDS) -> LayerReport:
    """Singular values and derived ranks of ``layer.delta()``, computed from the factors."""
    _, sigma, _ = factored_svd(layer.scaling * layer.left, layer.right)
    stats = spectrum_stats(sigma, layer.shape, thresholds)
    return LayerReport(
        layer.name, layer.kind, layer.shape, layer.rank, layer.scaling, stats, list(layer.notes)
    )


def inspect_adapter(path: str | Path, thresholds: tuple[float, ...] = ENERGY_THRESHOLDS) -> AdapterReport:
    """Spectrum report for every layer of the adapter folder at ``path``."""
    adapter = read_adapter(path)
    ordered = sorted(adapter.layers, key=lambda layer: natural_key(layer.name))
    layers = [layer_spectrum(layer, thresholds) for layer in ordered]
    return AdapterReport(
        str(adapter.path), adapter.peft_type, tuple(thresholds), layers, adapter.ignored_keys
    )


def update_directions(layer: LayerUpdate, side: str = "input") -> np.ndarray:
    """Orthonormal singular directions of ``layer.delta()`` (columns, by decreasing singular value).

    ``side="input"``: right singular vectors (in the layer's input space); ``"output"``: left ones.
    Only the first numerical-rank directions are returned (none for a zero update).
    """
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}.")
    U, sigma, Vh = factored_svd(layer.scaling * layer.left, layer.right)
    kept = numerical_rank(sigma, layer.shape)
    return Vh[:kept].T if side == "input" else U[:, :kept]


@dataclass
class LayerComparison:
    """Subspace similarity grid ``phi[i-1, j-1]`` for one layer present in both adapters."""

    name: str
    rank_a: int
    rank_b: int
    grid: np.ndarray | None
    note: str = ""

    def phi(self, i: int, j: int) -> float | None:
        """``phi(i, j)`` for ``1 <= i <= rank_a``, ``1 <= j <= rank_b``; None when undefined."""
        if self.grid is None:
            return None
        if not (1 <= i <= self.rank_a and 1 <= j <= self.rank_b):
            raise ValueError(f"phi({i}, {j}) is outside 1..{self.rank_a} x 1..{self.rank_b} for {self.name}.")
        return float(self.grid[i - 1, j - 1])

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "rank_a": self.rank_a,
            "rank_b": self.rank_b,
            "similarity": None if self.grid is None else self.grid.tolist(),
            "note": self.note,
        }


@dataclass
class ComparisonReport:
    """``compare_adapters`` result."""

    path_a: str
    path_b: str
    side: str
    layers: list[LayerComparison]
    only_in_a: list[str]
    only_in_b: list[str]

    def as_dict(self) -> dict:
        return {
            "path_a": self.path_a,
            "path_b": self.path_b,
            "side": self.side,
            "definition": "phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j); similarity[i-1][j-1]",
            "layers": [layer.as_dict() for layer in self.layers],
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
        }


def compare_layers(layer_a: LayerUpdate, layer_b: LayerUpdate, side: str = "input") -> LayerComparison:
    """Subspace similarity of two layers' updates (LoRA section 7.2)."""
    if layer_a.shape != layer_b.shape:
        note = f"shapes differ ({layer_a.shape} vs {layer_b.shape}); not comparable"
        return LayerComparison(layer_a.name, 0, 0, None, note)
    U = update_directions(layer_a, side)
    V = update_directions(layer_b, side)
    if U.shape[1] == 0 or V.shape[1] == 0:
        return LayerComparison(
            layer_a.name, U.shape[1], V.shape[1], None, "zero update; similarity undefined"
        )
    return LayerComparison(layer_a.name, U.shape[1], V.shape[1], subspace_similarity_grid(U, V))


def compare_adapters(path_a: str | Path, path_b: str | Path, side: str = "input") -> ComparisonReport:
    """Per-layer subspace similarity between the adapters at ``path_a`` and ``path_b``."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}.")
    adapter_a: Adapter = read_adapter(path_a)
    adapter_b: Adapter = read_adapter(path_b)
    layers_b = {layer.name: layer for layer in adapter_b.layers}
    names_a = {layer.name for layer in adapter_a.layers}
    comparisons = [
        compare_layers(layer, layers_b[layer.name], side)
        for layer in sorted(adapter_a.layers, key=lambda layer: natural_key(layer.name))
        if layer.name in layers_b
    ]
    return ComparisonReport(
        path_a=str(adapter_a.path),
        path_b=str(adapter_b.path),
        side=side,
        layers=comparisons,
        only_in_a=natural_sorted(names_a - set(layers_b)),
        only_in_b=natural_sorted(set(layers_b) - names_a),
    )
