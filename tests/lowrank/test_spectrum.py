"""Spectral helpers against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.lowrank import (
    energy_rank,
    factored_svd,
    numerical_rank,
    singular_values,
    spectrum_stats,
    stable_rank,
    subspace_similarity,
    subspace_similarity_grid,
    svd_optimum_loss,
)


def rotation(theta: float) -> np.ndarray:
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def test_singular_values_of_a_rotated_diagonal():
    # Q1 diag(5, 2) Q2 with rotations Q1, Q2 has singular values exactly 5 and 2.
    matrix = rotation(0.3) @ np.diag([2.0, 5.0]) @ rotation(-1.1)
    np.testing.assert_allclose(singular_values(matrix), [5.0, 2.0])


def test_svd_optimum_loss_is_sum_of_discarded_squares():
    matrix = np.diag([4.0, 2.0, 1.0])
    assert svd_optimum_loss(matrix, 1) == pytest.approx(4 + 1)
    assert svd_optimum_loss(matrix, 2) == pytest.approx(1)
    assert svd_optimum_loss(matrix, 3) == 0.0


def test_energy_rank_by_hand():
    sigma = np.array([4.0, 2.0, 1.0])  # energies 16, 4, 1 of 21: shares 0.762, 0.952, 1
    assert energy_rank(sigma, 0.5) == 1
    assert energy_rank(sigma, 0.9) == 2
    assert energy_rank(sigma, 0.99) == 3
    assert energy_rank(sigma, 1.0) == 3
    assert energy_rank(np.array([3.0, 1.0]), 0.9) == 1  # exactly 9/10 counts as reaching 90%
    assert energy_rank(np.zeros(3), 0.9) == 0
    with pytest.raises(ValueError):
        energy_rank(sigma, 0.0)


def test_stable_and_numerical_rank():
    assert stable_rank(np.array([4.0, 2.0, 1.0])) == pytest.approx(21 / 16)
    assert stable_rank(np.zeros(2)) == 0.0
    assert numerical_rank(np.array([3.0, 1e-20, 0.0]), (3, 3)) == 1
    assert numerical_rank(np.zeros(2), (2, 2)) == 0


def test_spectrum_stats_by_hand():
    stats = spectrum_stats(np.array([8.0, 4.0, 2.0]), (5, 3))
    assert stats.frobenius_norm == pytest.approx(math.sqrt(84))
    assert stats.spectral_norm == 8.0
    assert stats.stable_rank == pytest.approx(84 / 64)
    assert stats.energy_ranks == {0.9: 2, 0.99: 3}
    assert stats.as_dict()["energy_rank"] == {"0.9": 2, "0.99": 3}


def test_factored_svd_matches_dense_svd():
    rng = np.random.default_rng(0)
    left, right = rng.normal(size=(7, 3)), rng.normal(size=(3, 5))
    U, sigma, Vh = factored_svd(left, right)
    np.testing.assert_allclose(sigma, np.linalg.svd(left @ right, compute_uv=False)[:3])
    np.testing.assert_allclose(U @ np.diag(sigma) @ Vh, left @ right, atol=1e-12)
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="do not multiply"):
        factored_svd(left, right.T)


def test_subspace_similarity_hand_computed():
    e = np.eye(4)
    U = e[:, [0, 1]]
    assert subspace_similarity(U, U, 2, 2) == pytest.approx(1.0)
    assert subspace_similarity(U, e[:, [2, 3]], 2, 2) == pytest.approx(0.0)
    # span{e1, e2} vs span{e1, e3}: ||U^T V||_F^2 = 1, divided by min(2, 2) = 2.
    assert subspace_similarity(U, e[:, [0, 2]], 2, 2) == pytest.approx(0.5)
    # top direction e1 vs cos(60deg) e1 + sin(60deg) e2: cos^2 = 1/4.
    tilted = np.column_stack([0.5 * e[:, 0] + math.sqrt(3) / 2 * e[:, 1], e[:, 2]])
    assert subspace_similarity(U, tilted, 1, 1) == pytest.approx(0.25)
    # the tilted direction lies in span{e1, e2}: phi(2, 1) = (1/4 + 3/4) / 1.
    assert subspace_similarity(U, tilted, 2, 1) == pytest.approx(1.0)
    # span{e1,e2} vs span{tilted, e3}: overlaps 1/4 + 3/4 + 0 = 1, over 2 -> 0.5.
    assert subspace_similarity(U, tilted, 2, 2) == pytest.approx(0.5)
    grid = subspace_similarity_grid(U, tilted)
    np.testing.assert_allclose(grid, [[0.25, 0.25], [1.0, 0.5]])
    with pytest.raises(ValueError):
        subspace_similarity(U, tilted, 3, 1)
