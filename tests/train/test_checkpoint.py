"""Checkpoints: atomic layout, no pickle, exact optimizer/RNG round trip, partial ones ignored."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.optim import create_adamw
from lorakit.train import checkpoint as ckpt
from lorakit.train.checkpoint import (
    clean_partial,
    latest_checkpoint,
    list_checkpoints,
    load_trainable_state,
    optimizer_from_safetensors,
    read_checkpoint,
    save_checkpoint,
    write_adapter,
    write_json,
)
from lorakit.train.rng import capture_rng_state, restore_rng_state

from .helpers import tiny_llama


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    return model, create_adamw(model, lr=1e-2, weight_decay=0.1)


def _train_steps(model, optimizer, steps: int) -> None:
    model.train()
    for _ in range(steps):
        ids = torch.randint(4, 100, (2, 6))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _save(root, step, model, optimizer, keep=2):
    rng = {f"rank0/{k}": v for k, v in capture_rng_state().items()}
    state = {"epoch": 0, "step_in_epoch": step}
    return save_checkpoint(
        root, step, model=model, optimizer=optimizer, trainer_state=state, rng_states=rng, keep=keep
    )


def test_resume_from_checkpoint_continues_bit_exactly(tmp_path) -> None:
    model, optimizer = _model_and_optimizer()
    _train_steps(model, optimizer, 2)
    folder = _save(tmp_path, 2, model, optimizer)
    _train_steps(model, optimizer, 3)  # uses dropout + randint: RNG matters
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, fresh_optimizer = _model_and_optimizer(seed=123)  # different init, overwritten by the load
    saved = read_checkpoint(folder)
    load_trainable_state(fresh, saved["trainable"])
    names = {id(p): n for n, p in fresh.named_parameters()}
    optimizer_from_safetensors(fresh_optimizer, names, saved["optimizer_tensors"], saved["optimizer_index"])
    restore_rng_state({k.split("/", 1)[1]: v for k, v in saved["rng"].items()})
    _train_steps(fresh, fresh_optimizer, 3)
    for name, parameter in fresh.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, expected[name]), name
    assert saved["trainer_state"]["step"] == 2 and saved["trainer_state"]["step_in_epoch"] == 2


def test_files_are_safetensors_and_json_only(tmp_path) -> None:
    model, optimizer = _model_and_optimizer()
    _train_steps(model, optimizer, 1)
    folder = _save(tmp_path, 1, model, optimizer)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    data_files = [name for name in names if name != "adapter/README.md"]  # the model card is plain text
    assert all(name.endswith((".safetensors", ".json")) for name in data_files), names
    assert "adapter/adapter_model.safetensors" in names and "adapter/adapter_config.json" in names
    index = json.loads((folder / "optimizer.json").read_text())
    assert index["param_groups"][0]["weight_decay"] == 0.1 and index["tuple_keys"] == ["betas"]


def test_keeps_last_k_and_ignores_partial(tmp_path) -> None:
    model, optimizer = _model_and_optimizer()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, optimizer, keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]
    # A write interrupted before the rename, and a final-named folder with a file missing.
    (tmp_path / ".tmp-step-00000004-999").mkdir()
    broken = tmp_path / "step-00000005"
    broken.mkdir()
    (broken / "trainer_state.json").write_text('{"step": 5, "files": ["trainable.safetensors"]}')
    torn = tmp_path / "step-00000006"
    torn.mkdir()
    (torn / "trainer_state.json").write_text('{"step": 6, "fil')
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    clean_partial(tmp_path)
    assert not (tmp_path / ".tmp-step-00000004-999").exists()


def _fsynced(monkeypatch) -> list[str]:
    """Record the paths passed to os.fsync (by descriptor) during the test."""
    names: list[str] = []
    real = os.fsync

    def fsync(descriptor: int) -> None:
        names.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real(descriptor)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    return names


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads descriptor paths from /proc")
def test_checkpoint_and_final_adapter_are_fsynced_then_renamed(tmp_path, monkeypatch) -> None:
    model, optimizer = _model_and_optimizer()
    fsynced = _fsynced(monkeypatch)
    folder = _save(tmp_path / "checkpoints", 1, model, optimizer)
    assert any(name.endswith("/trainer_state.json") for name in fsynced)
    assert str(folder.parent) in fsynced  # the rename itself is made durable
    fsynced.clear()
    adapter_dir = tmp_path / "adapter"
    for _ in range(2):  # a first write, then a replacement
        write_adapter(model, adapter_dir, tmp_path / "checkpoints")
        assert any(name.endswith("/adapter_model.safetensors") for name in fsynced)
        assert str(tmp_path) in fsynced
        fsynced.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoints"]


def test_replacing_the_final_adapter_never_leaves_a_half_deleted_one(tmp_path, monkeypatch) -> None:
    """A crash while the old adapter is deleted: adapter/ is then complete (old or new) or absent."""
    model, optimizer = _model_and_optimizer()
    adapter_dir = tmp_path / "adapter"
    write_adapter(model, adapter_dir, tmp_path / "checkpoints")
    complete = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= complete
    real_rmtree = shutil.rmtree

    def crashing_rmtree(path, *args, **kwargs):
        files = sorted(p for p in Path(path).iterdir() if p.is_file()) if os.path.isdir(path) else []
        if files and not os.path.basename(path).startswith(".tmp-"):
            files[0].unlink()  # killed after the first file
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", crashing_rmtree)
    _train_steps(model, optimizer, 1)
    with pytest.raises(KeyboardInterrupt):
        write_adapter(model, adapter_dir, tmp_path / "checkpoints")
    if adapter_dir.exists():
        assert {p.name for p in adapter_dir.iterdir()} == complete


def test_write_json_is_the_one_json_writer(tmp_path) -> None:
    """Checkpoint files and the sub-commands' results (eval.json, ...): UTF-8 text kept, keys in order."""
    data = {"prompt": "Où est la café ✓?", "completion": "ici", "loss": 1.5}
    path = write_json(tmp_path / "out" / "nested" / "generate.json", data, mkdir=True)
    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "out" / "nested" / "generate.json" and json.loads(text) == data
    assert "Où est la café ✓?" in text and text.endswith("}\n")
    assert list(json.loads(text)) == ["prompt", "completion", "loss"]
    with pytest.raises(FileNotFoundError):  # without mkdir the folder must exist
        write_json(tmp_path / "missing" / "x.json", data)


def test_rng_round_trip() -> None:
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    state = capture_rng_state()
    expected = (torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), random.gauss(0, 1), np.random.rand()) == expected[1:]
