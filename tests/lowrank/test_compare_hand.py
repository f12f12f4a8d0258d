"""compare_adapters: subspace similarity (LoRA section 7.2) on hand-built adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.lowrank import compare_adapters

from .adapter_builders import lora_pair, write_adapter

E = np.eye(4)
CONFIG = {"r": 2, "lora_alpha": 2}
B_OUT = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (out=3, r=2), orthonormal columns


def adapter(folder, input_directions, strengths=(3.0, 1.0), module="model.q", extra=None):
    """B @ A = sum_k strength_k * b_k a_k^T with orthonormal a_k (rows of A) and b_k (columns of B)."""
    A = np.diag(strengths) @ np.asarray(input_directions)
    tensors = {**lora_pair(module, B_OUT, A), **(extra or {})}
    return write_adapter(folder, CONFIG, tensors)


def test_identical_adapters_have_similarity_one(tmp_path):
    a = adapter(tmp_path / "a", [E[0], E[1]])
    (layer,) = compare_adapters(a, a).layers
    np.testing.assert_allclose(layer.grid, np.ones((2, 2)), atol=1e-6)
    assert layer.phi(1, 1) == pytest.approx(1.0)


def test_orthogonal_subspaces_have_similarity_zero(tmp_path):
    a = adapter(tmp_path / "a", [E[0], E[1]])
    b = adapter(tmp_path / "b", [E[2], E[3]])
    (layer,) = compare_adapters(a, b).layers
    np.testing.assert_allclose(layer.grid, np.zeros((2, 2)), atol=1e-6)
    # Same output directions: on the output side the two updates coincide.
    (output_side,) = compare_adapters(a, b, side="output").layers
    np.testing.assert_allclose(output_side.grid, np.ones((2, 2)), atol=1e-6)


def test_intermediate_case_by_hand(tmp_path):
    # A: top direction e1 (strength 3), second e2.  B: top direction cos60 e1 + sin60 e2, second e3.
    tilted = 0.5 * E[0] + math.sqrt(3) / 2 * E[1]
    a = adapter(tmp_path / "a", [E[0], E[1]])
    b = adapter(tmp_path / "b", [tilted, E[2]])
    (layer,) = compare_adapters(a, b).layers
    # phi(1,1) = cos^2 60 = 1/4; phi(1,2) = (1/4 + 0) / 1; phi(2,1) = (1/4 + 3/4) / 1;
    # phi(2,2) = (1/4 + 3/4 + 0 + 0) / 2 = 1/2.
    np.testing.assert_allclose(layer.grid, [[0.25, 0.25], [1.0, 0.5]], atol=1e-6)
    assert layer.phi(2, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside"):
        layer.phi(3, 1)


def test_directions_ordered_by_singular_value_not_storage_order(tmp_path):
    # Storing the weak direction first must not change the result: directions come from the SVD.
    a = adapter(tmp_path / "a", [E[1], E[0]], strengths=(1.0, 3.0))
    b = adapter(tmp_path / "b", [E[0], E[2]])
    (layer,) = compare_adapters(a, b).layers
    assert layer.phi(1, 1) == pytest.approx(1.0)


def test_unmatched_layers_and_zero_updates(tmp_path):
    zero = lora_pair("model.zero", np.zeros((3, 2)), np.ones((2, 4)))
    only_a = lora_pair("model.only_a", B_OUT, np.ones((2, 4)))
    a = adapter(tmp_path / "a", [E[0], E[1]], extra={**zero, **only_a})
    b = adapter(
        tmp_path / "b", [E[0], E[1]], extra={**zero, **lora_pair("model.only_b", B_OUT, np.ones((2, 4)))}
    )
    report = compare_adapters(a, b)
    assert report.only_in_a == ["model.only_a"] and report.only_in_b == ["model.only_b"]
    layers = {layer.name: layer for layer in report.layers}
    assert layers["model.zero"].grid is None and "zero update" in layers["model.zero"].note
    assert layers["model.zero"].phi(1, 1) is None
    assert report.as_dict()["layers"][0]["similarity"] == [[pytest.approx(1.0)] * 2] * 2


def test_shape_mismatch_is_noted(tmp_path):
    a = adapter(tmp_path / "a", [E[0], E[1]])
    b = write_adapter(tmp_path / "b", CONFIG, lora_pair("model.q", B_OUT, np.eye(5)[:2]))
    (layer,) = compare_adapters(a, b).layers
    assert layer.grid is None and "shapes differ" in layer.note


def test_bad_side(tmp_path):
    a = adapter(tmp_path / "a", [E[0], E[1]])
    with pytest.raises(ValueError, match="side must be one of"):
        compare_adapters(a, a, side="both")
