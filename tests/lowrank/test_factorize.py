"""factorize(): the seed example pinned, the gradients, the SVD optimum and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.lowrank import (
    SEED_EXAMPLE_MATRIX,
    SEED_EXAMPLE_SETTINGS,
    FactorizationDivergedError,
    FactorizationError,
    factorize,
)

SEED_FIRST_ROW = [3.92499196, 3.06584542, 2.10616302, 0.84487308]
SEED_APPROXIMATION = [
    [3.92499196, 3.06584542, 2.10616302, 0.84487308],
    [1.80749375, 2.16899061, 2.27246474, 1.60187065],
    [1.39233235, 2.65559308, 3.44471033, 2.81139716],
    [-0.31000446, 1.27213581, 2.43876645, 2.35886822],
]


def run_seed_example(**overrides):
    settings = {**SEED_EXAMPLE_SETTINGS, **overrides}
    return factorize(SEED_EXAMPLE_MATRIX, **settings)


def test_seed_example_reproduces_printed_losses_and_matrix():
    result = run_seed_example()
    losses = result.loss_history
    assert len(losses) == 1000
    assert f"{losses[0]:.4f}" == "87.6534"
    assert f"{losses[100]:.4f}" == "2.3620"
    for epoch in range(200, 1000, 100):
        assert f"{losses[epoch]:.4f}" == "2.3566"
    np.testing.assert_allclose(result.approximation[0], SEED_FIRST_ROW, atol=5e-9)
    np.testing.assert_allclose(result.approximation, SEED_APPROXIMATION, atol=5e-9)


def test_seed_example_initial_factor_matches_np_random_seed_666():
    # The seed prints A after np.random.seed(666); A = np.random.randn(4, 2).
    result = factorize(SEED_EXAMPLE_MATRIX, rank=2, lr=1e-12, epochs=1, seed=666)
    expected_A0 = [
        [0.82418808, 0.479966],
        [1.17346801, 0.90904807],
        [-0.57172145, -0.10949727],
        [0.01902826, -0.94376106],
    ]
    np.testing.assert_allclose(result.A, expected_A0, atol=1e-7)


def test_seed_example_reaches_eckart_young_optimum():
    result = run_seed_example()
    # W has singular values ~8.7438, 3.3450, 1.5351, 0 -> optimum = 1.5351^2 + 0^2.
    sigma = np.linalg.svd(SEED_EXAMPLE_MATRIX, compute_uv=False)
    assert result.svd_optimum_loss == pytest.approx(sigma[2] ** 2 + sigma[3] ** 2, rel=1e-12)
    assert result.svd_optimum_loss == pytest.approx(2.3566366594760897, rel=1e-12)
    np.testing.assert_allclose(result.singular_values, sigma)
    assert result.reached_optimum()
    assert result.final_loss == pytest.approx(result.svd_optimum_loss, rel=1e-9)
    np.testing.assert_allclose(result.A @ result.B, result.approximation)


def test_one_step_matches_hand_computed_gradients():
    W = np.array([[1.0, 2.0], [3.0, 4.0]])
    A0 = np.array([[1.0], [0.0]])
    B0 = np.array([[0.5, 0.0]])
    # R = W - A0 B0 = [[0.5, 2], [3, 4]]; dA = -2 R B0^T = [[-0.5], [-3]]; dB = -2 A0^T R = [[-1, -4]].
    result = factorize(W, rank=1, lr=0.1, epochs=1, init=(A0, B0))
    np.testing.assert_allclose(result.A, [[1.05], [0.3]])
    np.testing.assert_allclose(result.B, [[0.6, 0.4]])
    expected_loss = np.sum((W - np.array([[1.05], [0.3]]) @ np.array([[0.6, 0.4]])) ** 2)
    assert result.loss_history[0] == pytest.approx(expected_loss)
    np.testing.assert_array_equal(A0, [[1.0], [0.0]])  # the explicit init is not modified


def test_gradient_formula_matches_finite_differences():
    rng = np.random.default_rng(0)
    W, A, B = rng.normal(size=(5, 4)), rng.normal(size=(5, 2)), rng.normal(size=(2, 4))
    lr = 1e-7
    result = factorize(W, rank=2, lr=lr, epochs=1, init=(A, B))
    grad_A_from_step = (A - result.A) / lr

    def loss(A_):
        return np.sum((W - A_ @ B) ** 2)

    eps = 1e-6
    numeric = np.zeros_like(A)
    for index in np.ndindex(A.shape):
        bump = np.zeros_like(A)
        bump[index] = eps
        numeric[index] = (loss(A + bump) - loss(A - bump)) / (2 * eps)
    np.testing.assert_allclose(grad_A_from_step, numeric, rtol=1e-5, atol=1e-6)


def test_full_rank_descent_goes_to_zero_and_rectangular_shapes():
    W = np.arange(12, dtype=float).reshape(3, 4) / 10
    result = factorize(W, rank=3, lr=0.05, epochs=3000, seed=1)
    assert result.A.shape == (3, 3) and result.B.shape == (3, 4)
    assert result.svd_optimum_loss == pytest.approx(0.0, abs=1e-20)
    assert result.final_loss < 1e-8


@pytest.mark.parametrize("init", ["normal_zeros", "zeros_normal", "normal"])
def test_init_schemes(init):
    result = factorize(SEED_EXAMPLE_MATRIX, rank=2, lr=0.01, epochs=2000, seed=3, init=init)
    assert result.init == init
    assert result.final_loss == pytest.approx(result.svd_optimum_loss, rel=1e-6)


def test_divergence_is_reported_with_advice():
    with pytest.raises(
        FactorizationDivergedError, match="lower the learning rate|Lower the learning rate"
    ) as info:
        run_seed_example(lr=0.1)
    assert info.value.epoch == 19
    assert not np.isfinite(info.value.loss_history[-1])


def test_progress_callback_every_n_epochs():
    seen = []
    run_seed_example(
        epochs=250, on_progress=lambda epoch, loss: seen.append((epoch, round(loss, 4))), log_every=100
    )
    assert seen == [(0, 87.6534), (100, 2.362), (200, 2.3566)]


@pytest.mark.parametrize(
    ("matrix", "kwargs", "message"),
    [
        (np.ones(4), {}, "2-D"),
        (np.ones((2, 2, 2)), {}, "2-D"),
        (np.array([["a", "b"], ["c", "d"]]), {}, "real numbers"),
        (np.ones((2, 2), dtype=complex), {}, "real numbers"),
        ([[1, 2], [3]], {}, "could not be read"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {}, "inf or NaN"),
        (np.zeros((0, 3)), {}, "empty"),
        (SEED_EXAMPLE_MATRIX, {"rank": 0}, "rank must be an integer between 1 and min"),
        (SEED_EXAMPLE_MATRIX, {"rank": 5}, "rank must be an integer between 1 and min"),
        (SEED_EXAMPLE_MATRIX, {"rank": 2.0}, "rank must be an integer"),
        (SEED_EXAMPLE_MATRIX, {"lr": 0.0}, "learning rate must be a positive"),
        (SEED_EXAMPLE_MATRIX, {"lr": -0.1}, "learning rate must be a positive"),
        (SEED_EXAMPLE_MATRIX, {"lr": float("nan")}, "learning rate must be a positive"),
        (SEED_EXAMPLE_MATRIX, {"epochs": 0}, "epochs must be a positive"),
        (SEED_EXAMPLE_MATRIX, {"init": "xavier"}, "unknown init"),
        (SEED_EXAMPLE_MATRIX, {"init": (np.ones((4, 3)), np.ones((2, 4)))}, "do not fit"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(matrix, kwargs, message):
    settings = {"rank": 2, "lr": 0.01, "epochs": 5, "seed": 0, **kwargs}
    with pytest.raises(FactorizationError, match=message):
        factorize(matrix, **settings)


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    result = factorize(torch.tensor(SEED_EXAMPLE_MATRIX), **SEED_EXAMPLE_SETTINGS)
    np.testing.assert_allclose(result.approximation[0], SEED_FIRST_ROW, atol=5e-9)
