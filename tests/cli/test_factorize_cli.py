"""`lorakit factorize` end to end through the CLI dispatcher."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from lorakit.cli import main

SEED_OUTPUT_LINES = [
    "Epoch: 0 , loss: 87.6534",
    "Epoch: 100 , loss: 2.3620",
    *[f"Epoch: {epoch} , loss: 2.3566" for epoch in range(200, 1000, 100)],
]


def test_default_runs_the_seed_example(capsys):
    assert main(["factorize"]) == 0
    out = capsys.readouterr().out
    epoch_lines = [line for line in out.splitlines() if line.startswith("Epoch:")]
    assert epoch_lines == SEED_OUTPUT_LINES
    assert "Final loss ||W - AB||_F^2: 2.3566" in out
    assert "SVD optimum at rank 2" in out and ": 2.3566" in out
    assert "reached the optimum" in out
    assert "[[ 3.92499196  3.06584542  2.10616302  0.84487308]" in out


def test_python_dash_m_entry_point():
    completed = subprocess.run(
        [sys.executable, "-m", "lorakit", "factorize", "--epochs", "101"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "Epoch: 100 , loss: 2.3620" in completed.stdout


@pytest.mark.parametrize("suffix", [".npy", ".csv", ".txt"])
def test_matrix_from_file(tmp_path, capsys, suffix):
    matrix = np.diag([3.0, 2.0, 1.0])  # rank-2 optimum = 1^2 = 1
    path = tmp_path / f"m{suffix}"
    if suffix == ".npy":
        np.save(path, matrix)
    else:
        np.savetxt(path, matrix, delimiter="," if suffix == ".csv" else " ")
    code = main(
        [
            "factorize",
            str(path),
            "--rank",
            "2",
            "--lr",
            "0.02",
            "--epochs",
            "2000",
            "--seed",
            "0",
            "--log-every",
            "500",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "shape (3, 3)" in out
    assert [line.split(" ,")[0] for line in out.splitlines() if line.startswith("Epoch:")] == [
        "Epoch: 0",
        "Epoch: 500",
        "Epoch: 1000",
        "Epoch: 1500",
    ]
    assert "Final loss ||W - AB||_F^2: 1.0000" in out
    assert "sum of squared discarded singular values 1.0000): 1.0000" in out


def test_plot_writes_png(tmp_path, capsys):
    target = tmp_path / "loss.png"
    assert main(["factorize", "--epochs", "50", "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Loss curve written to {target}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "0.1"], "diverged at epoch 19"),
        (["--lr", "0"], "learning rate must be a positive"),
        (["--rank", "0"], "rank must be an integer between 1 and min(shape) = 4"),
        (["--rank", "9"], "rank must be an integer between 1 and min(shape) = 4"),
        (["does-not-exist.npy"], "matrix file not found"),
    ],
)
def test_bad_input_exits_nonzero_with_message(args, message, capsys):
    assert main(["factorize", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_divergence_advises_lower_learning_rate(capsys):
    main(["factorize", "--lr", "0.1"])
    assert "Lower the learning rate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("text.csv", "1,2\nx,y\n", "could not read a numeric matrix"),
        ("ragged.txt", "1 2 3\n4 5\n", "could not read a numeric matrix"),
        ("empty.txt", "# nothing\n", "holds no numbers"),
        ("matrix.json", "[[1, 2]]", "unsupported file type"),
    ],
)
def test_bad_matrix_files(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    assert main(["factorize", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_npy_object_array_and_3d_array_are_refused(tmp_path, capsys):
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([[1, "a"], [None, 2]], dtype=object), allow_pickle=True)
    assert main(["factorize", str(objects)]) == 2
    assert "object arrays are refused" in capsys.readouterr().err
    cube = tmp_path / "cube.npy"
    np.save(cube, np.ones((2, 2, 2)))
    assert main(["factorize", str(cube)]) == 2
    assert "must be 2-D" in capsys.readouterr().err
    strings = tmp_path / "strings.npy"
    np.save(strings, np.array([["a", "b"], ["c", "d"]]))
    assert main(["factorize", str(strings), "--rank", "1"]) == 2
    assert "must hold real numbers" in capsys.readouterr().err
