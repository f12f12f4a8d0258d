"""Read a target matrix for ``lorakit factorize`` from .npy, .csv or .txt (never pickle)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lorakit.lowrank.factorize import FactorizationError

MATRIX_SUFFIXES = (".npy", ".csv", ".txt")


def load_matrix(path: str | Path) -> np.ndarray:
    """Load a 2-D numeric matrix: .npy (``allow_pickle=False``), .csv (commas), .txt (whitespace).

    ``#`` starts a comment in text files. A single row or column is returned as 1 x n / n x 1.
    """
    file = Path(path)
    if not file.is_file():
        raise FactorizationError(f"matrix file not found: {file}")
    suffix = file.suffix.lower()
    if suffix not in MATRIX_SUFFIXES:
        raise FactorizationError(
            f"{file}: unsupported file type {suffix!r}; use one of {', '.join(MATRIX_SUFFIXES)}."
        )
    if suffix == ".npy":
        return _load_npy(file)
    delimiter = "," if suffix == ".csv" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            matrix = np.loadtxt(file, delimiter=delimiter, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise FactorizationError(
            f"{file}: could not read a numeric matrix ({error}). Every row needs the same number of "
            f"numbers, separated by {'commas' if delimiter else 'spaces'}."
        ) from error
    if matrix.size == 0:
        raise FactorizationError(f"{file} holds no numbers.")
    return matrix


def _load_npy(file: Path) -> np.ndarray:
    try:
        matrix = np.load(file, allow_pickle=False)
    except ValueError as error:
        raise FactorizationError(
            f"{file}: not a plain numeric .npy array ({error}); object arrays are refused because they need pickle."
        ) from error
    except (OSError, EOFError) as error:
        raise FactorizationError(f"{file}: not a readable .npy file ({error}).") from error
    if not isinstance(matrix, np.ndarray):
        raise FactorizationError(f"{file}: expected one array, found {type(matrix).__name__}.")
    return matrix
