"""inspect_adapter on hand-written adapters whose singular values are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit.lowrank import AdapterReadError, inspect_adapter, read_adapter

from .adapter_builders import PREFIX, lora_pair, write_adapter

# Orthonormal rows (signed permutations): A = diag(4, 2, 1) @ Q_A, B = Q_B, so B @ A has singular values 4, 2, 1.
Q_A = np.array([[0, 1, 0, 0, 0], [0, 0, 0, -1, 0], [1, 0, 0, 0, 0]], dtype=float)
Q_B = np.array([[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, -1]], dtype=float)
A_341 = np.diag([4.0, 2.0, 1.0]) @ Q_A  # (r=3, in=5)
B_341 = Q_B  # (out=6, r=3)


def q_proj_adapter(tmp_path, **config):
    settings = {"r": 3, "lora_alpha": 6, **config}
    return write_adapter(tmp_path / "adapter", settings, lora_pair("model.layers.0.q_proj", B_341, A_341))


def test_linear_layer_singular_values_ranks_and_norm(tmp_path):
    report = inspect_adapter(q_proj_adapter(tmp_path))
    (layer,) = report.layers
    # scaling = alpha / r = 6 / 3 = 2 -> singular values 8, 4, 2; energies 64, 16, 4 of 84.
    assert layer.name == "model.layers.0.q_proj"
    assert layer.kind == "linear" and layer.shape == (6, 5) and layer.rank == 3
    assert layer.scaling == pytest.approx(2.0)
    np.testing.assert_allclose(layer.stats.singular_values, [8.0, 4.0, 2.0], atol=1e-6)
    assert layer.stats.frobenius_norm == pytest.approx(math.sqrt(84), rel=1e-6)
    assert layer.stats.energy_ranks == {0.9: 2, 0.99: 3}  # 64/84 = 0.76, 80/84 = 0.95
    assert layer.stats.stable_rank == pytest.approx(84 / 64, rel=1e-6)
    assert layer.stats.numerical_rank == 3


def test_delta_is_scaling_times_b_at_a(tmp_path):
    (layer,) = read_adapter(q_proj_adapter(tmp_path)).layers
    np.testing.assert_allclose(layer.delta(), 2.0 * B_341 @ A_341, atol=1e-6)


def test_rslora_scaling(tmp_path):
    (layer,) = inspect_adapter(q_proj_adapter(tmp_path, use_rslora=True)).layers
    scaling = 6 / math.sqrt(3)
    assert layer.scaling == pytest.approx(scaling)
    np.testing.assert_allclose(layer.stats.singular_values, [4 * scaling, 2 * scaling, scaling], rtol=1e-6)


def test_rank_and_alpha_patterns_match_module_suffixes(tmp_path):
    tensors = {
        **lora_pair("model.layers.0.q_proj", B_341, A_341),
        # rank 1 via rank_pattern; B @ A = 3 * 2 = singular value 6 before scaling.
        **lora_pair("model.layers.0.k_proj", [[3.0], [0.0]], [[0.0, 2.0, 0.0]]),
        **lora_pair("model.layers.1.k_proj", [[3.0], [0.0]], [[0.0, 2.0, 0.0]]),
    }
    config = {"r": 3, "lora_alpha": 6, "rank_pattern": {"k_proj": 1}, "alpha_pattern": {"layers.0.k_proj": 5}}
    layers = {
        layer.name: layer for layer in inspect_adapter(write_adapter(tmp_path / "a", config, tensors)).layers
    }
    assert layers["model.layers.0.k_proj"].scaling == pytest.approx(5.0)  # alpha 5 / r 1
    assert layers["model.layers.1.k_proj"].scaling == pytest.approx(6.0)  # alpha 6 / r 1
    np.testing.assert_allclose(layers["model.layers.0.k_proj"].stats.singular_values, [30.0], rtol=1e-6)
    np.testing.assert_allclose(layers["model.layers.1.k_proj"].stats.singular_values, [36.0], rtol=1e-6)
    assert layers["model.layers.0.q_proj"].scaling == pytest.approx(2.0)
    assert all(not layer.notes for layer in layers.values())


def test_pattern_keys_match_whole_dotted_suffixes_only(tmp_path):
    # As in PEFT, a key matches when the module name equals it or ends with "." + key (keys may be
    # regexes): "proj" does not match "q_proj", "layers.0" does not match "model.layers.0.q_proj".
    config = {"r": 3, "lora_alpha": 6, "alpha_pattern": {"proj": 100, "layers.0": 50, r"layers\.\d\.q_.*": 9}}
    tensors = lora_pair("model.layers.0.q_proj", B_341, A_341)
    (layer,) = inspect_adapter(write_adapter(tmp_path / "a", config, tensors)).layers
    assert layer.scaling == pytest.approx(9 / 3)


def test_embedding_delta_is_transposed(tmp_path):
    emb_A = np.array([[1.0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0]])  # (r=2, num_embeddings=5)
    emb_B = np.array([[0, 1.0], [3.0, 0], [0, 0]])  # (dim=3, r=2)
    tensors = {"model.embed.lora_embedding_A": emb_A, "model.embed.lora_embedding_B": emb_B}
    adapter = read_adapter(write_adapter(tmp_path / "e", {"r": 2, "lora_alpha": 2}, tensors))
    (layer,) = adapter.layers
    assert layer.kind == "embedding" and layer.shape == (5, 3)
    np.testing.assert_allclose(layer.delta(), (emb_B @ emb_A).T, atol=1e-6)
    (spectrum,) = inspect_adapter(adapter.path).layers
    np.testing.assert_allclose(spectrum.stats.singular_values, [3.0, 2.0], atol=1e-6)  # scaling 1


def test_dora_layer_is_marked(tmp_path):
    tensors = {
        **lora_pair("model.q", B_341, A_341),
        "model.q.lora_magnitude_vector": np.ones(6),
    }
    adapter = write_adapter(tmp_path / "d", {"r": 3, "lora_alpha": 3, "use_dora": True}, tensors)
    (layer,) = inspect_adapter(adapter).layers
    np.testing.assert_allclose(layer.stats.singular_values, [4.0, 2.0, 1.0], atol=1e-6)
    assert any("DoRA" in note for note in layer.notes)


def test_adalora_formula(tmp_path):
    A = Q_A[:2]  # (2, 5) orthonormal rows
    B = Q_B[:, :2]  # (6, 2) orthonormal columns
    E = np.array([[3.0], [-1.0]])
    tensors = {"model.q.lora_A": A, "model.q.lora_B": B, "model.q.lora_E": E}
    config = {"peft_type": "ADALORA", "r": 8, "init_r": 4, "lora_alpha": 8}
    adapter = write_adapter(tmp_path / "ada", config, tensors)
    (layer,) = read_adapter(adapter).layers
    scaling = 8 / (4 + 1e-5)  # lora_alpha / (ranknum + 1e-5) with ranknum = init_r
    np.testing.assert_allclose(layer.delta(), B @ (A * E) * scaling, atol=1e-6)
    (spectrum,) = inspect_adapter(adapter).layers
    np.testing.assert_allclose(spectrum.stats.singular_values, [3 * scaling, 1 * scaling], rtol=1e-6)
    assert any("kept 2 of 4" in note for note in layer.notes)


def test_conv_kernels_are_flattened(tmp_path):
    A = np.zeros((2, 3, 2, 2))
    A[0, 0, 0, 0], A[1, 2, 1, 1] = 5.0, 1.0
    B = np.zeros((4, 2, 1, 1))
    B[1, 0], B[3, 1] = 1.0, 1.0
    adapter = write_adapter(tmp_path / "c", {"r": 2, "lora_alpha": 2}, lora_pair("conv", B, A))
    (layer,) = inspect_adapter(adapter).layers
    assert layer.kind == "conv" and layer.shape == (4, 12)
    np.testing.assert_allclose(layer.stats.singular_values, [5.0, 1.0], atol=1e-6)


def test_zero_update_has_zero_ranks(tmp_path):
    adapter = write_adapter(
        tmp_path / "z", {"r": 2, "lora_alpha": 4}, lora_pair("m", np.zeros((3, 2)), np.ones((2, 3)))
    )
    (layer,) = inspect_adapter(adapter).layers
    assert layer.stats.frobenius_norm == 0.0
    assert layer.stats.energy_ranks == {0.9: 0, 0.99: 0} and layer.stats.numerical_rank == 0


def test_other_tensors_are_ignored_and_listed(tmp_path):
    tensors = {**lora_pair("m", B_341, A_341), "embed.base_layer.weight": np.ones((2, 2))}
    report = inspect_adapter(write_adapter(tmp_path / "o", {"r": 3, "lora_alpha": 3}, tensors))
    assert [layer.name for layer in report.layers] == ["m"]
    assert report.ignored_keys == [PREFIX + "embed.base_layer.weight"]


def test_keys_with_adapter_names(tmp_path):
    tensors = {"model.q.lora_A.first.weight": A_341, "model.q.lora_B.first.weight": B_341}
    (layer,) = read_adapter(write_adapter(tmp_path / "n", {"r": 3, "lora_alpha": 3}, tensors)).layers
    assert layer.name == "model.q[first]"
    np.testing.assert_allclose(layer.delta(), B_341 @ A_341, atol=1e-6)


# ---- bad input -------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(AdapterReadError, match="adapter folder not found"):
        read_adapter(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    file = tmp_path / "x.safetensors"
    file.write_bytes(b"")
    with pytest.raises(AdapterReadError, match="is a file"):
        read_adapter(file)


def test_missing_config_points_to_subfolders(tmp_path):
    q_proj_adapter(tmp_path)  # tmp_path/adapter holds one
    with pytest.raises(AdapterReadError, match="no adapter_config.json.*sub-folders: adapter"):
        read_adapter(tmp_path)


def test_invalid_json_config(tmp_path):
    folder = q_proj_adapter(tmp_path)
    (folder / "adapter_config.json").write_text("{r: 3")
    with pytest.raises(AdapterReadError, match="not valid JSON"):
        read_adapter(folder)


def test_missing_weights_mentions_pickle(tmp_path):
    folder = q_proj_adapter(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterReadError, match="not found. Only adapter_model.bin .*does not read pickles"):
        read_adapter(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, damage):
    folder = q_proj_adapter(tmp_path)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00not a safetensors file" if damage == "garbage" else data[: len(data) - 20])
    with pytest.raises(AdapterReadError, match="not a readable safetensors file"):
        read_adapter(folder)


def test_no_lora_keys(tmp_path):
    folder = write_adapter(tmp_path / "n", {"r": 2}, {"model.lm_head.weight": np.ones((2, 2))})
    with pytest.raises(AdapterReadError, match="contains no LoRA tensors"):
        read_adapter(folder)


def test_missing_partner_tensor(tmp_path):
    folder = write_adapter(tmp_path / "p", {"r": 2}, {"model.q.lora_A.weight": np.ones((2, 3))})
    with pytest.raises(AdapterReadError, match="layer model.q has no lora_B"):
        read_adapter(folder)


def test_mismatched_ranks(tmp_path):
    folder = write_adapter(tmp_path / "m", {"r": 2}, lora_pair("model.q", np.ones((4, 3)), np.ones((2, 5))))
    with pytest.raises(AdapterReadError, match="does not fit"):
        read_adapter(folder)


def test_non_lora_adapter_type(tmp_path):
    folder = write_adapter(tmp_path / "ia3", {"peft_type": "IA3"}, {"model.q.ia3_l": np.ones(3)})
    with pytest.raises(AdapterReadError, match="IA3 adapter"):
        read_adapter(folder)
