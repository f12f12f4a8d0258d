"""Spectral quantities used to choose and judge a LoRA rank.

* Eckart-Young(-Mirsky): the best rank-r approximation of ``W`` in Frobenius norm is its truncated
  SVD, and its squared error is the sum of the squared discarded singular values,
  ``sum_{i>r} sigma_i^2``.
* Energy rank: the smallest ``k`` whose leading singular values carry a fraction ``tau`` of the
  energy ``sum sigma_i^2`` (= ``||W||_F^2``).
* Stable rank: ``||W||_F^2 / ||W||_2^2``, a continuous lower bound of the rank.
* Subspace similarity (Hu et al., 2021, LoRA, section 7.2):
  ``phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j)`` where ``U_i`` and ``V_j`` hold the top-i and top-j
  orthonormal singular directions of two updates; 1 when one span contains the other, 0 when they are
  orthogonal.

A LoRA update ``L @ R`` (``L``: m x r, ``R``: r x n) has rank <= r, so its SVD is computed from the
factors without ever forming the m x n product (see :func:`factored_svd`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENERGY_THRESHOLDS = (0.90, 0.99)


def singular_values(matrix) -> np.ndarray:
    """Singular values of a 2-D matrix in descending order (float64)."""
    return np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)


def svd_optimum_loss(matrix, rank: int) -> float:
    """Eckart-Young: ``min_{rank(X) <= r} ||W - X||_F^2 = sum_{i > r} sigma_i(W)^2``."""
    sigma = singular_values(matrix)
    return float(np.sum(sigma[rank:] ** 2))


def energy_rank(sigma: np.ndarray, fraction: float) -> int:
    """Smallest ``k`` with ``sum_{i<=k} sigma_i^2 >= fraction * sum_i sigma_i^2``; 0 for a zero matrix.

    ``sigma`` must be sorted in descending order. A relative slack of 1e-12 absorbs rounding so that
    an exact 90% share counts as reaching 90%.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the energy fraction must be in (0, 1], got {fraction}.")
    energy = np.asarray(sigma, dtype=np.float64) ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cumulative = np.cumsum(energy) / total
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def stable_rank(sigma: np.ndarray) -> float:
    """``||W||_F^2 / ||W||_2^2 = sum sigma_i^2 / sigma_1^2``; 0 for a zero matrix."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.size == 0 or sigma[0] == 0.0:
        return 0.0
    return float(np.sum(sigma**2) / sigma[0] ** 2)


def numerical_rank(sigma: np.ndarray, shape: tuple[int, int]) -> int:
    """Number of singular values above ``max(shape) * eps * sigma_1`` (NumPy's matrix_rank rule)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if sigma.size == 0 or sigma[0] == 0.0:
        return 0
    tolerance = sigma[0] * max(shape) * np.finfo(np.float64).eps
    return int(np.sum(sigma > tolerance))


def factored_svd(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``U, S, Vh`` of ``left @ right`` (m x r times r x n) in O((m + n) r^2) work.

    With ``left = Q_L R_L`` and ``right^T = Q_R R_R`` (reduced QR),
    ``left @ right = Q_L (R_L R_R^T) Q_R^T``; the SVD ``M = U_m S V_m^T`` of the small r x r core
    gives ``U = Q_L U_m`` and ``Vh = V_m^T Q_R^T``. Returns r singular triplets (some may be zero).
    """
    left = np.asarray(left, dtype=np.float64)
    right = np.asarray(right, dtype=np.float64)
    if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"factors do not multiply: {left.shape} @ {right.shape}.")
    q_left, r_left = np.linalg.qr(left)
    q_right, r_right = np.linalg.qr(right.T)
    core_u, sigma, core_vh = np.linalg.svd(r_left @ r_right.T)
    return q_left @ core_u, sigma, core_vh @ q_right.T


def subspace_similarity(U: np.ndarray, V: np.ndarray, i: int, j: int) -> float:
    """LoRA section 7.2: ``phi(i, j) = ||U[:, :i]^T V[:, :j]||_F^2 / min(i, j)``, in [0, 1].

    ``U`` and ``V`` have orthonormal columns (singular directions sorted by singular value).
    """
    if not (1 <= i <= U.shape[1] and 1 <= j <= V.shape[1]):
        raise ValueError(f"i and j must be in [1, {U.shape[1]}] and [1, {V.shape[1]}], got {i}, {j}.")
    if U.shape[0] != V.shape[0]:
        raise ValueError(f"the directions live in different spaces: {U.shape[0]} vs {V.shape[0]} dims.")
    overlap = U[:, :i].T @ V[:, :j]
    return float(np.sum(overlap**2) / min(i, j))


def subspace_similarity_grid(U: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``phi(i, j)`` for all ``1 <= i <= U.shape[1]``, ``1 <= j <= V.shape[1]`` (entry [i-1, j-1])."""
    squared = (U.T @ V) ** 2
    # Frobenius norm of every leading block: 2-D cumulative sums of the squared overlaps.
    block_norms = np.cumsum(np.cumsum(squared, axis=0), axis=1)
    sizes = np.minimum.outer(np.arange(1, U.shape[1] + 1), np.arange(1, V.shape[1] + 1))
    return block_norms / sizes


@dataclass
class SpectrumStats:
    """Singular values of an update and the ranks and norms derived from them."""

    singular_values: np.ndarray
    frobenius_norm: float
    spectral_norm: float
    stable_rank: float
    numerical_rank: int
    energy_ranks: dict[float, int]

    def as_dict(self) -> dict:
        return {
            "singular_values": [float(s) for s in self.singular_values],
            "frobenius_norm": self.frobenius_norm,
            "spectral_norm": self.spectral_norm,
            "stable_rank": self.stable_rank,
            "numerical_rank": self.numerical_rank,
            "energy_rank": {f"{fraction:g}": k for fraction, k in self.energy_ranks.items()},
        }


def spectrum_stats(
    sigma: np.ndarray, shape: tuple[int, int], thresholds: tuple[float, ...] = ENERGY_THRESHOLDS
) -> SpectrumStats:
    """Summarise descending singular values ``sigma`` of a matrix of the given shape."""
    sigma = np.asarray(sigma, dtype=np.float64)
    return SpectrumStats(
        singular_values=sigma,
        frobenius_norm=float(np.sqrt(np.sum(sigma**2))),
        spectral_norm=float(sigma[0]) if sigma.size else 0.0,
        stable_rank=stable_rank(sigma),
        numerical_rank=numerical_rank(sigma, shape),
        energy_ranks={fraction: energy_rank(sigma, fraction) for fraction in thresholds},
    )
