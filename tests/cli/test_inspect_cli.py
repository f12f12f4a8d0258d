"""`lorakit inspect` through the CLI dispatcher, on hand-built adapters with known spectra."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lorakit.cli import main
from tests.lowrank.adapter_builders import lora_pair, write_adapter

E = np.eye(4)


@pytest.fixture
def adapter_dir(tmp_path):
    # q: B @ A has singular values 4, 2, 1; scaling 6 / 3 = 2 -> 8, 4, 2.
    A = np.diag([4.0, 2.0, 1.0]) @ E[:3]
    B = np.vstack([np.eye(3), np.zeros((2, 3))])
    # v: rank-1 update 1 * e1 e1^T padded to r = 3, scaling 2 -> singular value 2.
    A_v = np.zeros((3, 4))
    A_v[0, 0] = 1.0
    tensors = {**lora_pair("model.layers.0.q_proj", B, A), **lora_pair("model.layers.0.v_proj", B, A_v)}
    return write_adapter(tmp_path / "adapter", {"r": 3, "lora_alpha": 6}, tensors)


def test_table_output(adapter_dir, capsys):
    assert main(["inspect", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "(LORA, 2 adapted layers)" in out
    q_row = next(line for line in out.splitlines() if line.startswith("model.layers.0.q_proj"))
    assert q_row.split() == [
        "model.layers.0.q_proj",
        "linear",
        "5x4",
        "3",
        "2",
        "9.165",
        "1.31",
        "2",
        "3",
        "8",
        "4",
        "2",
    ]
    v_row = next(line for line in out.splitlines() if line.startswith("model.layers.0.v_proj"))
    assert v_row.split()[5:9] == ["2", "1.00", "1", "1"]
    assert "Summary: mean stored rank 3.00; k@90% mean 1.50, max 2; k@99% mean 2.00, max 3" in out


def test_json_output(adapter_dir, capsys):
    assert main(["inspect", str(adapter_dir), "--json", "--thresholds", "0.5", "0.95"]) == 0
    data = json.loads(capsys.readouterr().out)
    q = data["layers"][0]
    assert q["name"] == "model.layers.0.q_proj" and q["shape"] == [5, 4]
    assert q["singular_values"] == pytest.approx([8.0, 4.0, 2.0], abs=1e-5)
    assert q["frobenius_norm"] == pytest.approx(math.sqrt(84), rel=1e-6)
    assert q["energy_rank"] == {"0.5": 1, "0.95": 2}  # 64/84 = 0.76, 80/84 = 0.952
    assert data["layers"][1]["singular_values"] == pytest.approx([2.0, 0.0, 0.0], abs=1e-5)


def test_plot(adapter_dir, tmp_path, capsys):
    target = tmp_path / "spectra.png"
    assert main(["inspect", str(adapter_dir), "--plot", str(target)]) == 0
    assert target.read_bytes()[:4] == b"\x89PNG"
    assert "Figure written to" in capsys.readouterr().out


def test_json_stays_parseable_with_plot(adapter_dir, tmp_path, capsys):
    assert main(["inspect", str(adapter_dir), "--json", "--plot", str(tmp_path / "s.png")]) == 0
    json.loads(capsys.readouterr().out)


def test_compare(adapter_dir, tmp_path, capsys):
    A_b = np.zeros((3, 4))
    A_b[0] = 0.5 * E[0] + math.sqrt(3) / 2 * E[1]  # 60 degrees from e1
    A_b[1] = 0.5 * E[2]
    B = np.vstack([np.eye(3), np.zeros((2, 3))])
    other = write_adapter(
        tmp_path / "other", {"r": 3, "lora_alpha": 6}, lora_pair("model.layers.0.q_proj", B, A_b)
    )
    assert main(["inspect", str(adapter_dir), "--compare", str(other)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("model.layers.0.q_proj"))
    # q ranks 3 (A) and 2 (B); phi(1,1) = 1/4; phi(2,2): overlaps of span{e1,e2} with {t, e3} = 1 -> 1/2.
    assert row.split() == ["model.layers.0.q_proj", "3", "2", "0.2500", "2", "0.5000"]
    assert "Only in A: model.layers.0.v_proj" in out
    assert main(["inspect", str(adapter_dir), "--compare", str(other), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layers"][0]["similarity"][1][1] == pytest.approx(0.5)
    assert (
        main(["inspect", str(adapter_dir), "--compare", str(other), "--plot", str(tmp_path / "c.png")]) == 0
    )
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "adapter folder not found"),
        ("no_config", "has no adapter_config.json"),
        ("corrupt", "not a readable safetensors file"),
        ("no_lora", "contains no LoRA tensors"),
    ],
)
def test_errors_are_clear_and_without_traceback(tmp_path, capsys, setup, message):
    folder = tmp_path / "adapter"
    if setup != "missing":
        write_adapter(folder, {"r": 2}, {"model.head.weight": np.ones((2, 2))})
    if setup == "no_config":
        (folder / "adapter_config.json").unlink()
    if setup == "corrupt":
        (folder / "adapter_model.safetensors").write_bytes(b"garbage")
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_threshold(adapter_dir, capsys):
    assert main(["inspect", str(adapter_dir), "--thresholds", "1.5"]) == 2
    assert "thresholds must be in (0, 1]" in capsys.readouterr().err


def test_layers_are_listed_in_natural_order(tmp_path, capsys):
    layers = [0, 1, 2, 10, 11]
    tensors = {}
    for index in layers:
        tensors |= lora_pair(f"model.layers.{index}.q_proj", np.eye(2), np.eye(2) * (index + 1))
    folder = write_adapter(tmp_path / "many", {"r": 2, "lora_alpha": 2}, tensors)
    assert main(["inspect", str(folder), "--json"]) == 0
    names = [layer["name"] for layer in json.loads(capsys.readouterr().out)["layers"]]
    assert names == [f"model.layers.{i}.q_proj" for i in layers]  # not 0, 1, 10, 11, 2
    assert main(["inspect", str(folder), "--compare", str(folder), "--json"]) == 0
    compared = [layer["name"] for layer in json.loads(capsys.readouterr().out)["layers"]]
    assert compared == names


def test_natural_key():
    from lorakit.lowrank.analysis import natural_sorted

    names = ["b.10.x", "b.9.x", "a.100", "a.20.y", "a.20.x", "b.9"]
    assert natural_sorted(names) == ["a.20.x", "a.20.y", "a.100", "b.9", "b.9.x", "b.10.x"]
