"""Crash-safe checkpoints: safetensors + JSON only, written to a temp folder and renamed into place.

A checkpoint ``<output_dir>/checkpoints/step-00000120/`` holds

* ``adapter/``                  the adapter in PEFT format (``save_pretrained``), for users;
* ``trainable.safetensors``     every trainable parameter by its exact name, for a bit-exact resume;
* ``optimizer.safetensors``     optimizer state tensors, keyed ``<parameter name>/<state key>``;
* ``optimizer.json``            the index: parameter groups (hyper-parameters, parameter names) and
                                the non-tensor state values;
* ``rng.safetensors``           RNG states of every rank, keyed ``rank<r>/<generator>``;
* ``method.safetensors``        (AdaLoRA only) importance scores and rank pattern;
* ``trainer_state.json``        step, data position, scheduler and scaler state; written last.

Writing goes to ``.tmp-step-...`` and ends with one ``os.rename`` (atomic on POSIX), so a folder with
a final name is complete; a run killed mid-write leaves only a ``.tmp-*`` folder, which is ignored
and cleaned up. Old checkpoints are first renamed to ``.trash-*`` and then deleted, for the same reason.

Two refusals protect what is already on disk. Parameters that are NaN or infinite are never written (a
checkpoint, the final adapter or ``best/``): :class:`NonFiniteError` names them before anything is created.
A write that fails for lack of space or permission (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``, as an
``OSError`` or as a ``SafetensorError`` whose text carries the OS error) removes its temp folder and raises
:class:`CheckpointWriteError`, a one-line message naming the newest intact checkpoint and how to free
space; older checkpoints are untouched because nothing is pruned before the new
one is complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

STEP_DIR = re.compile(r"^step-(\d+)$")
REQUIRED_FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors")
STATE_FILE = "trainer_state.json"
METHOD_FILE = "method.safetensors"
# Write failures that are the disk's or the mount's, not a bug: reported in one line, never a traceback.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
# safetensors reports I/O failures as a SafetensorError (not an OSError) whose text holds Rust's
# "I/O error: No space left on device (os error 28)" (its Display form, safetensors 0.8) or, in Rust's
# Debug form, "IoError(Os { code: 28, kind: StorageFull, ... })"; the number is the errno.
_OS_ERROR = re.compile(r"\bos error (\d+)|\bOs \{ code: (\d+)", re.IGNORECASE)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why."""


class NonFiniteError(CheckpointError):
    """Refused to write parameters that are NaN or infinite (a diverged run)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint or adapter could not be written (disk full, quota, read-only, permission)."""


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, in order."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(tensors: Mapping[str, torch.Tensor], target: Path, checkpoints: Path) -> None:
    """Raise :class:`NonFiniteError` before ``target`` is written from non-finite ``tensors``."""
    bad = non_finite_names(tensors)
    if bad:
        newest = latest_checkpoint(checkpoints)
        raise NonFiniteError(
            f"Refusing to write {target}: {len(bad)} parameter tensor(s) hold NaN or infinite values "
            f"(first: '{bad[0]}'); the training diverged. Newest checkpoint left intact: "
            f"{newest or 'none written yet'}."
        )


def write_errno(error: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s, or the ``os error N`` in a ``SafetensorError``'s text
    (safetensors wraps I/O failures that way); None when there is none."""
    if isinstance(error, OSError):
        return error.errno
    if isinstance(error, SafetensorError):
        match = _OS_ERROR.search(str(error))
        return int(match.group(1) or match.group(2)) if match else None
    return None


@contextlib.contextmanager
def writing(temp: Path, target: Path, checkpoints: Path) -> Iterator[None]:
    """Turn a disk-full or permission error while writing ``temp`` (for ``target``) into a one-line
    :class:`CheckpointWriteError`; the partial ``temp`` is removed, which also frees its space.

    Both an ``OSError`` and a ``SafetensorError`` carrying an OS error count (see :func:`write_errno`)."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        code = write_errno(error)
        if code not in WRITE_ERRNOS:
            raise
        reason = (error.strerror if isinstance(error, OSError) else None) or os.strerror(code)
        shutil.rmtree(temp, ignore_errors=True)
        newest = latest_checkpoint(checkpoints)
        intact = f"intact (newest: {newest})" if newest else "none written yet"
        raise CheckpointWriteError(
            f"Could not write {target}: {reason}. Previous checkpoints "
            f"are {intact}. Free space or fix permissions in {target.parent} (delete old runs or "
            "checkpoints, lower save_total_limit), then run the same command with --resume."
        ) from None


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: str | Path, data: Any, *, mkdir: bool = False) -> Path:
    """``data`` as indented UTF-8 JSON (keys in their order, text unescaped) in ``path``; returns the path.

    The one JSON writer of the trainer (checkpoint files, ``summary.json``, ``best.json``) and of the
    sub-commands' result files (``eval.json``, ...); ``mkdir`` creates the missing parent folders.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached, contiguous, on CPU."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back in place (into the shards under FSDP); names and shapes must
    match exactly."""
    from lorakit.train.fsdp import copy_full_into

    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(parameters) != set(tensors):
        missing = sorted(set(parameters) - set(tensors))[:3]
        extra = sorted(set(tensors) - set(parameters))[:3]
        raise CheckpointError(
            f"Checkpoint parameters do not match the model (missing {missing}, unexpected {extra}); "
            "resume with the same model and adapter settings, or use a new output_dir."
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.shape != tensors[name].shape:
                raise CheckpointError(
                    f"Shape of '{name}' differs: {tuple(tensors[name].shape)} in checkpoint."
                )
            copy_full_into(parameter, tensors[name])


def optimizer_to_safetensors(
    optimizer: torch.optim.Optimizer, names: dict[int, str], state_dict: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` (or the given, e.g. gathered, one) into tensors and a JSON index keyed by
    parameter name."""
    state_dict = optimizer.state_dict() if state_dict is None else state_dict
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, per_param in state_dict["state"].items():
        name = ordered[index]
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(name, {})[key] = value
    groups = []
    for group in state_dict["param_groups"]:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        settings["params"] = [ordered[i] for i in group["params"]]
        groups.append(settings)
    return tensors, {"param_groups": groups, "values": values, "tuple_keys": _tuple_keys(state_dict)}


def _tuple_keys(state_dict: dict[str, Any]) -> list[str]:
    return sorted(
        {k for group in state_dict["param_groups"] for k, v in group.items() if isinstance(v, tuple)}
    )


def optimizer_from_safetensors(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    tensors: dict[str, torch.Tensor],
    index: dict[str, Any],
) -> None:
    """Load what :func:`optimizer_to_safetensors` wrote into ``optimizer`` (same parameter order)."""
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [name for group in index["param_groups"] for name in group["params"]]
    if ordered != saved:
        raise CheckpointError(
            "Optimizer parameters differ from the checkpoint; resume with the same settings."
        )
    position = {name: i for i, name in enumerate(ordered)}
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, state_key = key.rpartition("/")
        state.setdefault(position[name], {})[state_key] = tensor
    for name, extra in index["values"].items():
        state.setdefault(position[name], {}).update(extra)
    groups = []
    for group in index["param_groups"]:
        settings = {k: (tuple(v) if k in index["tuple_keys"] else v) for k, v in group.items()}
        settings["params"] = [position[name] for name in group["params"]]
        groups.append(settings)
    from lorakit.train.fsdp import shard_optimizer_state  # full tensors into the shards of sharded parameters

    optimizer.load_state_dict(shard_optimizer_state(optimizer, {"state": state, "param_groups": groups}))


def checkpoint_dir(root: Path, step: int) -> Path:
    """The folder of checkpoint ``step`` under ``root``: ``step-00000120``."""
    return root / f"step-{step:08d}"


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rng_states: dict[str, torch.Tensor],
    keep: int,
    method_state: dict[str, torch.Tensor] | None = None,
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and keep only the newest ``keep``.

    ``method_state``: extra tensors of the adapter method (AdaLoRA's allocator), in ``method.safetensors``.
    ``gathered``: (trainable parameters, optimizer state dict) as whole tensors, when the model is sharded.
    """
    final = checkpoint_dir(root, step)
    temp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    trainable = trainable_state(model) if gathered is None else gathered[0]
    check_finite(trainable, final, root)
    with writing(temp, final, root):
        root.mkdir(parents=True, exist_ok=True)
        optimizer_state = None if gathered is None else gathered[1]
        _write_checkpoint(
            temp,
            model,
            (optimizer, optimizer_state),
            trainable,
            trainer_state,
            rng_states,
            step,
            method_state,
            sharded=gathered is not None,
        )
        replace_folder(temp, final)  # an older run's checkpoint of the same step is replaced
    prune_checkpoints(root, keep)
    return final


def _write_checkpoint(
    temp: Path,
    model: nn.Module,
    optimizer: tuple[torch.optim.Optimizer, dict[str, Any] | None],
    trainable: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    rng_states: dict[str, torch.Tensor],
    step: int,
    method_state: dict[str, torch.Tensor] | None,
    sharded: bool = False,
) -> None:
    """Every file of a checkpoint into ``temp`` (see the module docstring); state file last."""
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    names = {id(p): n for n, p in model.named_parameters()}
    model.save_pretrained(str(temp / "adapter"), **({"state_dict": trainable} if sharded else {}))
    save_file(trainable, str(temp / "trainable.safetensors"))
    tensors, index = optimizer_to_safetensors(optimizer[0], names, optimizer[1])
    save_file(tensors, str(temp / "optimizer.safetensors"))
    write_json(temp / "optimizer.json", index)
    save_file({k: v.contiguous() for k, v in rng_states.items()}, str(temp / "rng.safetensors"))
    files = list(REQUIRED_FILES)
    if method_state:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in method_state.items()}, str(temp / METHOD_FILE)
        )
        files.append(METHOD_FILE)
    write_json(temp / STATE_FILE, {**trainer_state, "step": step, "files": files})


def write_adapter(
    model: nn.Module, adapter_dir: Path, checkpoints: Path, gathered: dict[str, torch.Tensor] | None = None
) -> None:
    """The final adapter (``save_pretrained``) into ``adapter_dir``, replaced atomically; refused when
    non-finite, a one-line :class:`CheckpointWriteError` when the disk is full (``checkpoints``: for the
    message, the folder whose newest checkpoint is named). ``gathered``: the trainable parameters as whole
    tensors, for a sharded model."""
    check_finite(trainable_state(model) if gathered is None else gathered, adapter_dir, checkpoints)
    temp = adapter_dir.with_name(".tmp-adapter")
    with writing(temp, adapter_dir, checkpoints):
        shutil.rmtree(temp, ignore_errors=True)
        model.save_pretrained(str(temp), **({} if gathered is None else {"state_dict": gathered}))
        replace_folder(temp, adapter_dir)


def replace_folder(temp: Path, final: Path) -> None:
    """Make the fully written folder ``temp`` the folder ``final`` (replacing an older one), crash-safely.

    fsync the files, move an existing ``final`` away (a rename, so ``final`` never holds a half-deleted
    folder), one rename, fsync the parent. Used for checkpoints, the final ``adapter/`` and ``best/`` (see
    :mod:`lorakit.train.early_stopping`, outside ``checkpoints/`` so that :func:`prune_checkpoints` never
    touches it).
    """
    _fsync_tree(temp)
    if final.exists():
        _discard(final)
    os.rename(temp, final)
    _fsync_dir(final.parent)


def _discard(folder: Path) -> None:
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """A final-named folder whose state file parses and whose listed files all exist."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = state.get("files", REQUIRED_FILES)
    return all((folder / name).is_file() for name in files) and (folder / "adapter").is_dir()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, folder), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = STEP_DIR.match(folder.name)
        if match and folder.is_dir() and is_complete(folder):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None; partial (``.tmp-*``) folders never count."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints."""
    for _, folder in list_checkpoints(root)[:-keep]:
        _discard(folder)


def clean_partial(root: Path) -> None:
    """Remove leftovers of interrupted writes and deletions (``.tmp-*``, ``.trash-*``)."""
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(folder, ignore_errors=True)


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Everything in a checkpoint, read from safetensors and JSON only."""
    return {
        "trainable": load_file(str(folder / "trainable.safetensors")),
        "optimizer_tensors": load_file(str(folder / "optimizer.safetensors")),
        "optimizer_index": json.loads((folder / "optimizer.json").read_text(encoding="utf-8")),
        "rng": load_file(str(folder / "rng.safetensors")),
        "trainer_state": json.loads((folder / STATE_FILE).read_text(encoding="utf-8")),
        "method": load_file(str(folder / METHOD_FILE)) if (folder / METHOD_FILE).is_file() else {},
    }
