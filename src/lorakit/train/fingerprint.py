"""The fingerprint of a run, so that ``--resume`` refuses to continue a run that has changed.

A checkpoint's ``trainer_state.json`` holds, under ``"fingerprint"``, what defines the run:

* ``config``: every :class:`~lorakit.train.config.TrainConfig` field except the run's bookkeeping
  (:data:`BOOKKEEPING_FIELDS`) and the fields that only say where the model and data come from
  (:data:`SOURCE_FIELDS`, compared by content instead). Deny by default: a new field is fingerprinted
  unless someone lists it here.
* ``data``: for the training and the held-out data, the number of examples and tokens and a SHA-256 over
  every tokenized example in order (each key's ids as little-endian int32, with its length).
* ``model``: the base model's recorded name (shown, never compared: the same weights may sit elsewhere),
  its ``config.json`` without volatile keys, and a SHA-256 over the name, dtype and shape of every tensor in
  its safetensors files plus up to :data:`WINDOWS` windows of :data:`WINDOW_BYTES` bytes of each tensor's data
  (with no local files to hash, the name is compared instead).
* ``run``: the number of processes.

:func:`check_resume` compares a saved fingerprint with the current one and raises :class:`ResumeMismatch`
listing every difference (``field: old -> new``). Only :data:`SAFE_FIELDS` may differ, and only when named
in ``resume_allow_changes``; every other difference is refused, whatever the flag says.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.train.checkpoint import CheckpointError
from lorakit.train.config import FIELD_NAMES, ConfigError, TrainConfig, normalize_key

VERSION = 1

# What this run is called and where it writes: never part of what it trains.
BOOKKEEPING_FIELDS = frozenset({"output_dir", "resume", "overwrite_output_dir", "resume_allow_changes"})
# Where the model and data come from: compared by what they load (weights, token ids), not by name.
SOURCE_FIELDS = frozenset(
    {
        "model",
        "dataset",
        "dataset_config",
        "dataset_split",
        "eval_dataset",
        "eval_dataset_split",
        "column_mapping",
        "dataset_format",
    }
)
# Fingerprinted, but allowed to differ on resume when named in resume_allow_changes: they decide when to
# evaluate, save, log and stop, what is generated at the end, and on which hardware; not the math of a step.
SAFE_FIELDS = frozenset(
    {
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "logging_steps",
        "report_to",
        "early_stopping_patience",
        "divergence_threshold",
        "early_stopping_threshold",
        "sample_prompts",
        "sample_max_new_tokens",
        "device",
        "cpu_keep_freed_memory",
        "gradient_checkpointing",
        "compile",
        "fsdp_cpu_offload",  # where FSDP keeps the shards, not what they compute
    }
)

VOLATILE_MODEL_KEYS = ("_name_or_path", "_commit_hash", "transformers_version")
WINDOW_BYTES = 4096
WINDOWS = 8


class ResumeMismatch(CheckpointError):
    """``--resume`` found a checkpoint of a run that differs from this one; the message lists how."""


@dataclass(frozen=True)
class Difference:
    """One way the run differs from the checkpoint's: ``key: old -> new``."""

    key: str
    old: str
    new: str
    safe: bool = False

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


# ------------------------------------------------------------------------------------------- parts
def config_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The fingerprinted config fields as JSON values (everything but bookkeeping and sources)."""
    values = dataclasses.asdict(config)
    kept = {k: v for k, v in values.items() if k not in BOOKKEEPING_FIELDS | SOURCE_FIELDS}
    return json.loads(json.dumps(kept))


def token_digest(examples: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, Any]:
    """Examples, tokens and SHA-256 over every example's keys and int32 ids, in order."""
    digest = hashlib.sha256()
    tokens = 0
    for example in examples:
        for key in sorted(example):
            ids = np.asarray(example[key], dtype="<i4")
            digest.update(f"{key}:{ids.size};".encode())
            digest.update(ids.tobytes())
        tokens += len(example.get("input_ids", ()))
    return {"examples": len(examples), "tokens": tokens, "sha256": digest.hexdigest()}


def _model_folder(name_or_path: str | None) -> Path | None:
    """The local folder ``from_pretrained`` read for this model (a Hub id: its HF cache snapshot)."""
    from lorakit.models.loading import model_folder

    location = model_folder(name_or_path)
    if Path(location).is_dir():
        return Path(location)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(location, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def weights_digest(folder: Path) -> str | None:
    """SHA-256 over every tensor's name, dtype, shape and sampled bytes in ``folder/*.safetensors``.

    Tensors up to ``WINDOWS * WINDOW_BYTES`` bytes are read whole; larger ones in ``WINDOWS`` evenly spaced
    windows (the first and last included). Independent of sharding, file metadata and tensor order.
    """
    entries = []
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        entries += [(name, path, 8 + size, e) for name, e in header.items() if name != "__metadata__"]
    if not entries:
        return None
    digest = hashlib.sha256()
    for name, path, data_start, entry in sorted(entries, key=lambda item: item[0]):
        begin, end = entry["data_offsets"]
        digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
        with open(path, "rb") as handle:
            for offset in _windows(end - begin):
                handle.seek(data_start + begin + offset)
                digest.update(handle.read(min(WINDOW_BYTES, end - begin - offset)))
    return digest.hexdigest()


def _windows(length: int) -> list[int]:
    if length <= WINDOWS * WINDOW_BYTES:
        return list(range(0, length, WINDOW_BYTES))
    last = length - WINDOW_BYTES
    return [round(i * last / (WINDOWS - 1)) for i in range(WINDOWS)]


def model_fingerprint(name_or_path: str | None) -> dict[str, Any]:
    """Recorded name, ``config.json`` (minus volatile keys) and :func:`weights_digest` of the base model."""
    from lorakit.models.loading import recorded_name, resolve_source

    folder = _model_folder(name_or_path)
    config = None
    if folder is not None and (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = {k: v for k, v in config.items() if k not in VOLATILE_MODEL_KEYS}
        if "torch_dtype" in config:  # transformers renamed it; the same model re-saved keeps its identity
            config.setdefault("dtype", config.pop("torch_dtype"))
    return {
        "name": recorded_name(resolve_source(name_or_path)),
        "config": config,
        "weights_sha256": weights_digest(folder) if folder is not None else None,
    }


def run_fingerprint(
    config: TrainConfig,
    train: Sequence[Mapping[str, Sequence[int]]],
    held_out: Sequence[Mapping[str, Sequence[int]]],
    *,
    world_size: int,
) -> dict[str, Any]:
    """The whole fingerprint of a run (see the module docstring); plain JSON."""
    train_source = config.dataset or "bundled sample"
    eval_source = config.eval_dataset or (
        "bundled sample" if config.dataset is None else f"from {config.dataset}"
    )
    return {
        "version": VERSION,
        "config": config_fingerprint(config),
        "data": {
            "train": {**token_digest(train), "source": train_source},
            "eval": {**token_digest(held_out), "source": eval_source},
        },
        "model": model_fingerprint(config.model),
        # No "keeps_best_adapter" any more (checkpoints that hold it still resume: only the current keys
        # are compared): best/ is written whenever there is held-out data, which "data" covers, and
        # whether the best is restored at the end is the config's load_best_model_at_end and
        # early_stopping_patience, so it only made the safe early_stopping_patience unchangeable.
        "run": {"processes": world_size},
    }


# ------------------------------------------------------------------------------------------ compare
def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str) else json.dumps(value)


def _show_data(part: Mapping[str, Any]) -> str:
    return (
        f"{part.get('examples')} examples, {part.get('tokens')} tokens, "
        f"sha256 {str(part.get('sha256'))[:12]} ({part.get('source')})"
    )


def _field_defaults() -> dict[str, Any]:
    from lorakit.train.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def compare(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Difference]:
    """Every difference between two fingerprints: config fields, data, base model, processes."""
    differences = []
    old_config, new_config = saved.get("config", {}), current["config"]
    for key in [*new_config, *(k for k in old_config if k not in new_config)]:
        old, new = old_config.get(key, "(not recorded)"), new_config.get(key, "(not recorded)")
        if key not in old_config and new == _field_defaults().get(key, "(no default)"):
            continue  # a field added after that checkpoint was written, at its default: the run is the same
        if old != new:
            differences.append(Difference(key, _show(old), _show(new), key in SAFE_FIELDS))
    for split in ("train", "eval"):
        old, new = saved.get("data", {}).get(split, {}), current["data"][split]
        if any(old.get(k) != new[k] for k in ("examples", "tokens", "sha256")):
            differences.append(Difference(f"{split} data", _show_data(old), _show_data(new)))
    differences += _compare_models(saved.get("model", {}), current["model"])
    for key, new in current["run"].items():
        old = saved.get("run", {}).get(key)
        if old != new:
            differences.append(Difference(key.replace("_", " "), _show(old), _show(new)))
    return differences


def _compare_models(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Difference]:
    differences = []
    old_config, new_config = old.get("config") or {}, new.get("config") or {}
    for key in sorted(set(old_config) | set(new_config)):
        if old_config.get(key) != new_config.get(key):
            differences.append(
                Difference(
                    f"base model config.json {key}", _show(old_config.get(key)), _show(new_config.get(key))
                )
            )
    if old.get("weights_sha256") != new.get("weights_sha256"):
        differences.append(
            Difference(
                "base model weights",
                f"sha256 {str(old.get('weights_sha256'))[:12]} ({old.get('name')})",
                f"sha256 {str(new.get('weights_sha256'))[:12]} ({new.get('name')})",
            )
        )
    elif new.get("weights_sha256") is None and old.get("name") != new.get("name"):  # no files to hash
        differences.append(Difference("base model", _show(old.get("name")), _show(new.get("name"))))
    return differences


def allowed_changes(names: Sequence[str] | None) -> frozenset[str]:
    """Validate ``resume_allow_changes``: config field names (or aliases) from :data:`SAFE_FIELDS` only."""
    allowed = frozenset(normalize_key(name) for name in names or ())
    unknown = sorted(name for name in allowed if name not in FIELD_NAMES)
    unsafe = sorted(name for name in allowed if name in FIELD_NAMES and name not in SAFE_FIELDS)
    if unknown or unsafe:
        problems = [f"unknown field(s) {', '.join(unknown)}"] if unknown else []
        if unsafe:
            problems.append(f"{', '.join(unsafe)} change(s) what is trained and can never be overridden")
        raise ConfigError(
            f"'resume_allow_changes': {'; '.join(problems)}. Fields safe to change on resume: "
            f"{', '.join(sorted(SAFE_FIELDS))}."
        )
    return allowed


def check_resume(
    saved: Mapping[str, Any], current: Mapping[str, Any], allowed: frozenset[str], folder: Path
) -> list[Difference]:
    """The differences ``allowed`` lets through; raises :class:`ResumeMismatch` listing all of them otherwise."""
    differences = compare(saved, current)
    refused = [d for d in differences if not (d.safe and d.key in allowed)]
    if not refused:
        return differences
    unsafe = [d.key for d in refused if not d.safe]
    safe = [d.key for d in refused if d.safe]
    lines = [f"Cannot resume from {folder}: this run differs from the run that wrote it:"]
    lines += [f"  {d}" + ("  (safe to change)" if d.safe else "") for d in differences]
    if unsafe:
        lines.append(
            f"These change what is trained and can never be overridden: {', '.join(unsafe)}. Resume with the "
            "same data, batch sizes, steps, model, settings and number of processes, or use a new output_dir "
            "(or --overwrite_output_dir to start over)."
        )
    if safe:
        lines.append(
            f"To continue with the new value(s) of safe fields, add --resume_allow_changes {','.join(safe)}."
        )
    raise ResumeMismatch("\n".join(lines))
