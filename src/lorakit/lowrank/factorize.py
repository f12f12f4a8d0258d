"""Low-rank matrix factorization by plain gradient descent (the teaching example lorakit grew from).

Given a target ``W`` (m x n) and a rank ``r``, find ``A`` (m x r) and ``B`` (r x n) minimising

    L(A, B) = ||W - A B||_F^2

by full-batch gradient descent with the exact gradients

    dL/dA = -2 (W - A B) B^T        dL/dB = -2 A^T (W - A B)

Both gradients are evaluated at the *same* (pre-update) ``A`` and ``B``, then both factors are
stepped: ``A <- A - lr dL/dA``, ``B <- B - lr dL/dB``. The loss recorded for epoch ``i`` is the loss
*after* that epoch's update. This is exactly the loop of the seed example, so
``factorize(SEED_EXAMPLE_MATRIX, **SEED_EXAMPLE_SETTINGS)`` reproduces its printed losses.

The default initialisation is the one of the seed and of LoRA (Hu et al., 2021, section 4.1):
one factor Gaussian, the other zero, so the product starts at zero.

Gradient descent can at best reach the Eckart-Young optimum (the sum of the squared discarded
singular values of ``W``); the result carries that number so the two can be compared.

The implementation is NumPy (float64) on purpose: the problem is tiny and exact reproducibility of
the seed's numbers matters more than speed. Anything ``numpy.asarray`` accepts (lists, NumPy arrays,
CPU torch tensors) can be passed as ``W``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lorakit.lowrank.spectrum import singular_values, svd_optimum_loss

# The teaching example: a 4x4 matrix approximated at rank 2.
SEED_EXAMPLE_MATRIX = np.array(
    [[4, 3, 2, 1], [2, 2, 2, 2], [1, 3, 4, 2], [0, 1, 2, 3]],
    dtype=np.float64,
)
SEED_EXAMPLE_SETTINGS = {"rank": 2, "lr": 0.01, "epochs": 1000, "seed": 666, "init": "normal_zeros"}

INIT_SCHEMES = ("normal_zeros", "zeros_normal", "normal")
ProgressCallback = Callable[[int, float], None]


class FactorizationError(ValueError):
    """Bad input to :func:`factorize` (shape, dtype, rank, learning rate, ...)."""


class FactorizationDivergedError(FactorizationError):
    """Gradient descent blew up (the loss became inf or NaN)."""

    def __init__(self, message: str, epoch: int, loss_history: list[float]) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.loss_history = loss_history


@dataclass
class FactorizationResult:
    """Outcome of :func:`factorize`.

    ``A`` (m x r) and ``B`` (r x n) are the learned factors, ``approximation = A @ B`` and ``target``
    the matrix ``W`` (as float64).
    ``loss_history[i]`` is ``||W - A B||_F^2`` after epoch ``i``. ``svd_optimum_loss`` is the
    smallest rank-r loss any method can reach (Eckart-Young), ``singular_values`` those of ``W``.
    """

    A: np.ndarray
    B: np.ndarray
    approximation: np.ndarray
    loss_history: np.ndarray
    svd_optimum_loss: float
    singular_values: np.ndarray
    rank: int
    lr: float
    epochs: int
    init: str
    seed: int | None
    target: np.ndarray = field(repr=False)

    @property
    def final_loss(self) -> float:
        """Loss after the last epoch."""
        return float(self.loss_history[-1])

    @property
    def gap_to_optimum(self) -> float:
        """``final_loss - svd_optimum_loss`` (>= 0 up to rounding)."""
        return self.final_loss - self.svd_optimum_loss

    def reached_optimum(self, rtol: float = 1e-6, atol: float = 1e-9) -> bool:
        """Whether descent got within ``atol + rtol * optimum`` of the Eckart-Young optimum."""
        return self.gap_to_optimum <= atol + rtol * self.svd_optimum_loss


def factorize(
    W,
    rank: int,
    lr: float = 0.01,
    epochs: int = 1000,
    seed: int | None = 0,
    init: str | tuple[np.ndarray, np.ndarray] = "normal_zeros",
    *,
    init_std: float = 1.0,
    on_progress: ProgressCallback | None = None,
    log_every: int = 100,
) -> FactorizationResult:
    """Approximate ``W`` by ``A @ B`` of rank ``rank`` with gradient descent on ``||W - AB||_F^2``.

    Args:
        W: the target matrix, 2-D, real numbers, all finite.
        rank: inner dimension r, ``1 <= r <= min(W.shape)``.
        lr: learning rate (step size), > 0.
        epochs: number of full gradient steps, >= 1.
        seed: seed of the legacy NumPy generator (``np.random.RandomState``) used for the Gaussian
            factor; ``np.random.seed(666); np.random.randn(m, r)`` draws the same numbers.
        init: ``"normal_zeros"`` (A ~ N(0, init_std^2), B = 0: the seed and LoRA), ``"zeros_normal"``
            (A = 0, B ~ N(0, init_std^2)), ``"normal"`` (both Gaussian; A drawn first), or an
            explicit ``(A0, B0)`` pair (copied, never modified).
        init_std: standard deviation of the Gaussian factor(s).
        on_progress: called as ``on_progress(epoch, loss)`` every ``log_every`` epochs
            (epochs 0, log_every, 2*log_every, ...).
        log_every: progress period in epochs, >= 1.

    Raises:
        FactorizationError: invalid input, with the reason and the fix.
        FactorizationDivergedError: the loss became inf/NaN; lower ``lr``.
    """
    target = _as_target_matrix(W)
    _check_hyperparameters(target.shape, rank, lr, epochs, log_every, init_std)
    A, B, init_name = _initial_factors(target.shape, rank, init, seed, init_std)

    loss_history: list[float] = []
    with np.errstate(over="ignore", invalid="ignore"):
        for epoch in range(epochs):
            residual = target - A @ B
            grad_A = -2.0 * residual @ B.T
            grad_B = -2.0 * A.T @ residual
            A -= lr * grad_A
            B -= lr * grad_B
            loss = float(np.linalg.norm(target - A @ B, "fro") ** 2)
            loss_history.append(loss)
            if not math.isfinite(loss):
                raise FactorizationDivergedError(_divergence_message(epoch, lr), epoch, loss_history)
            if on_progress is not None and epoch % log_every == 0:
                on_progress(epoch, loss)

    return FactorizationResult(
        A=A,
        B=B,
        approximation=A @ B,
        loss_history=np.asarray(loss_history),
        svd_optimum_loss=svd_optimum_loss(target, rank),
        singular_values=singular_values(target),
        rank=rank,
        lr=float(lr),
        epochs=epochs,
        init=init_name,
        seed=seed,
        target=target,
    )


def _divergence_message(epoch: int, lr: float) -> str:
    return (
        f"gradient descent diverged at epoch {epoch}: the loss became inf/NaN with learning rate {lr:g}. "
        f"Lower the learning rate (for example lr={lr / 10:g})."
    )


def _as_target_matrix(W) -> np.ndarray:
    try:
        array = np.asarray(W)
    except (TypeError, ValueError) as error:  # ragged lists and the like
        raise FactorizationError(f"the matrix could not be read as an array ({error}).") from error
    if array.dtype.kind not in "biuf":
        raise FactorizationError(
            f"the matrix must hold real numbers, got dtype {array.dtype}. "
            "Convert it to floats (complex, text and object entries are not supported)."
        )
    if array.ndim != 2:
        raise FactorizationError(f"the matrix must be 2-D, got {array.ndim}-D with shape {array.shape}.")
    if array.size == 0:
        raise FactorizationError(f"the matrix is empty (shape {array.shape}).")
    target = array.astype(np.float64)
    if not np.all(np.isfinite(target)):
        raise FactorizationError("the matrix contains inf or NaN entries; replace them with finite numbers.")
    return target


def _check_hyperparameters(
    shape: tuple[int, int], rank: int, lr: float, epochs: int, log_every: int, init_std: float
) -> None:
    max_rank = min(shape)
    if not _is_int(rank) or not 1 <= rank <= max_rank:
        raise FactorizationError(
            f"rank must be an integer between 1 and min(shape) = {max_rank} for a {shape[0]}x{shape[1]} "
            f"matrix, got {rank!r}."
        )
    if not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise FactorizationError(f"the learning rate must be a positive number, got {lr!r}.")
    if not _is_int(epochs) or epochs < 1:
        raise FactorizationError(f"epochs must be a positive integer, got {epochs!r}.")
    if not _is_int(log_every) or log_every < 1:
        raise FactorizationError(f"log_every must be a positive integer, got {log_every!r}.")
    if not isinstance(init_std, numbers.Real) or not math.isfinite(init_std) or init_std <= 0:
        raise FactorizationError(f"init_std must be a positive number, got {init_std!r}.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _initial_factors(
    shape: tuple[int, int], rank: int, init, seed: int | None, init_std: float
) -> tuple[np.ndarray, np.ndarray, str]:
    m, n = shape
    if isinstance(init, tuple | list):
        return (*_explicit_factors(shape, rank, init), "explicit")
    if init not in INIT_SCHEMES:
        raise FactorizationError(
            f"unknown init {init!r}; choose one of {', '.join(INIT_SCHEMES)} or pass an (A0, B0) pair."
        )
    rng = np.random.RandomState(seed)
    if init == "normal_zeros":
        return init_std * rng.randn(m, rank), np.zeros((rank, n)), init
    if init == "zeros_normal":
        return np.zeros((m, rank)), init_std * rng.randn(rank, n), init
    A = init_std * rng.randn(m, rank)
    return A, init_std * rng.randn(rank, n), init


def _explicit_factors(shape: tuple[int, int], rank: int, pair) -> tuple[np.ndarray, np.ndarray]:
    if len(pair) != 2:
        raise FactorizationError("an explicit init must be a pair (A0, B0).")
    A0, B0 = (np.array(factor, dtype=np.float64) for factor in pair)
    if A0.shape != (shape[0], rank) or B0.shape != (rank, shape[1]):
        raise FactorizationError(
            f"explicit init shapes {A0.shape} and {B0.shape} do not fit: expected A0 {(shape[0], rank)} "
            f"and B0 {(rank, shape[1])}."
        )
    if not (np.all(np.isfinite(A0)) and np.all(np.isfinite(B0))):
        raise FactorizationError("the explicit initial factors contain inf or NaN entries.")
    return A0, B0
