"""GGUF files converted once to a safetensors folder in lorakit's cache, so later loads take about a second.

Loading a GGUF through transformers (``from_pretrained(folder, gguf_file=name)``) parses the file and
dequantizes every tensor to float (tens of seconds even for a 135M model). lorakit does that once, writes the
float model and its tokenizer with ``save_pretrained`` (safetensors + JSON) and loads that folder afterwards.

Layout: ``<cache root>/models/<name>/`` where the cache root is ``cache_dir``, else ``$LORAKIT_CACHE``, else
``~/.cache/lorakit``. A folder is complete when it holds ``lorakit-cache.json`` (written last); conversion
writes into a temporary sibling folder and renames it into place, so a killed conversion never leaves a
half-written cache. The marker records a fingerprint of the GGUF (size and SHA-256 of its first and last MiB);
a different file at the same place (e.g. a new package version) triggers a fresh conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.models.errors import ModelLoadError

CACHE_ENV = "LORAKIT_CACHE"
MARKER_NAME = "lorakit-cache.json"
CACHE_FORMAT = 1
_FINGERPRINT_SPAN = 1 << 20


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The lorakit cache folder: ``cache_dir``, else ``$LORAKIT_CACHE``, else ``~/.cache/lorakit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "lorakit"


def gguf_fingerprint(gguf_path: Path) -> str:
    """SHA-256 over the file size and its first and last MiB: cheap, and changes with the file's content."""
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(gguf_path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_SPAN))
        if size > _FINGERPRINT_SPAN:
            handle.seek(max(size - _FINGERPRINT_SPAN, _FINGERPRINT_SPAN))
            digest.update(handle.read())
    return digest.hexdigest()


def cache_folder_name(gguf_path: Path, fingerprint: str) -> str:
    """Folder name for a user's GGUF: its stem plus 12 hex digits of its fingerprint."""
    return f"{gguf_path.stem}-{fingerprint[:12]}"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of a cache folder, or None when the folder is missing or incomplete."""
    try:
        marker = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not (folder / "config.json").is_file():
        return None
    return marker


def is_valid_cache(folder: Path, fingerprint: str) -> bool:
    marker = read_marker(folder)
    return (
        marker is not None
        and marker.get("format") == CACHE_FORMAT
        and marker.get("gguf_fingerprint") == fingerprint
    )


def load_gguf(gguf_path: Path, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Model and tokenizer straight from a GGUF file, every tensor dequantized to ``dtype`` (slow)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x always dequantizes
        extra: dict[str, Any] = {}
    else:
        extra = {"quantization_config": GgufConfig(dequantize=True)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise ModelLoadError(
            f"Could not load the GGUF file {gguf_path}: {error}. transformers reads GGUF files of the "
            "architectures it supports (llama, mistral, qwen2, ...); it needs the packages gguf and accelerate."
        ) from error
    _drop_gguf_traces(model)
    return model, tokenizer


def _drop_gguf_traces(model: Any) -> None:
    """A dequantized GGUF model is a plain float model: remove what would mark it as quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert_gguf(gguf_path: Path, target: Path) -> tuple[Any, Any]:
    """Load ``gguf_path`` and write it as safetensors + tokenizer to ``target``, atomically.

    Returns the in-memory (model, tokenizer) that was written. An existing stale folder at ``target`` is
    replaced; if another process completed the same conversion meanwhile, its folder is kept.
    """
    started = time.perf_counter()
    fingerprint = gguf_fingerprint(gguf_path)
    model, tokenizer = load_gguf(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        marker = {
            "format": CACHE_FORMAT,
            "source": str(gguf_path),
            "gguf_fingerprint": fingerprint,
            "conversion_seconds": round(time.perf_counter() - started, 2),
        }
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, target, fingerprint)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer


def _move_into_place(staging: Path, target: Path, fingerprint: str) -> None:
    """Rename ``staging`` to ``target``; a stale ``target`` is first renamed aside, then deleted."""
    if target.exists():
        if is_valid_cache(target, fingerprint):
            return  # a concurrent conversion finished first
        aside = target.with_name(f".{target.name}.stale-{os.getpid()}-{time.time_ns()}")
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not is_valid_cache(target, fingerprint):
            raise


def ensure_converted(gguf_path: Path, target: Path, *, say=None) -> Path:
    """The cache folder for ``gguf_path`` at ``target``, converting first when it is missing or stale."""
    fingerprint = gguf_fingerprint(gguf_path)
    if not is_valid_cache(target, fingerprint):
        if say is not None:
            say(f"Converting {gguf_path.name} to safetensors in {target} (once; later loads are fast)...")
        convert_gguf(gguf_path, target)
    return target
