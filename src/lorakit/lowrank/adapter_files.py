"""Read a saved LoRA / AdaLoRA adapter folder into per-layer low-rank factors.

A folder written by ``save_pretrained`` (lorakit or Hugging Face PEFT) holds ``adapter_config.json``
and ``adapter_model.safetensors``. Only JSON and safetensors are read (never pickle).

Every adapted layer's update is returned in factored form ``delta = scaling * left @ right`` in the
mathematical orientation of the layer (``y = W x + delta x``; ``fan_in_fan_out`` only changes how a
base weight is stored, not the update's singular values or directions):

* Linear / Conv1D: ``lora_A`` (r, in), ``lora_B`` (out, r): ``delta = scaling * B @ A`` with
  ``scaling = alpha / r`` (Hu et al., 2021, section 4.1) or ``alpha / sqrt(r)`` with rsLoRA
  (Kalajdzievski, 2023). ``r`` and ``alpha`` may be overridden per module by ``rank_pattern`` and
  ``alpha_pattern`` (a key matches a module name it equals or ends with after a dot; regexes allowed).
* Conv: ``lora_A`` (r, in, *kernel), ``lora_B`` (out, r, 1...) are flattened to matrices, so the
  delta is the (out, in * prod(kernel)) reshaped kernel update.
* Embedding: ``lora_embedding_A`` (r, num_embeddings), ``lora_embedding_B`` (dim, r):
  ``delta = scaling * (B @ A)^T`` of shape (num_embeddings, dim).
* DoRA (Liu et al., 2024): the ``lora_magnitude_vector`` rescales columns after the update; the delta
  reported is the LoRA direction update ``scaling * B @ A`` and the layer is marked.
* AdaLoRA (Zhang et al., 2023): ``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r):
  ``delta = B @ (A * E) * scaling / (ranknum + 1e-5)`` with ``scaling = lora_alpha`` (or ``init_r``
  when ``lora_alpha <= 0``) and ``ranknum = init_r`` (PEFT keeps the initial rank after pruning).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lorakit.config import CONFIG_NAME, lora_scaling, read_config_json
from lorakit.serialization import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter_weights

_PREFIX = "base_model.model."
# The low-rank factors of the LoRA family (LoRA, DoRA, AdaLoRA) as they appear in saved keys: the
# ``factor_names`` of lorakit's LoRA layers (linear_layer, embedding_layer, adalora) and DoRA's magnitude.
LOW_RANK_FACTOR_PARTS = (
    "lora_A",
    "lora_B",
    "lora_E",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)
_KEY_PATTERN = re.compile(
    rf"^(?P<module>.+?)\.(?P<part>{'|'.join(LOW_RANK_FACTOR_PARTS)})(?:\.(?P<adapter>[^.]+))?$"
)
# Pickle files an adapter folder may hold instead of safetensors; named in the error, never read.
_PICKLE_NAMES = (PICKLE_WEIGHTS_NAME, "adapter_model.pt")
# PEFT's defaults for keys a config file leaves out.
_DEFAULT_R = 8
_DEFAULT_ALPHA = 8


class AdapterReadError(ValueError):
    """The adapter folder cannot be analysed; the message names the problem and the fix."""


@dataclass
class LayerUpdate:
    """One adapted module's low-rank update, read from an adapter file: ``delta = scaling * left @ right``."""

    name: str
    kind: str  # "linear", "conv", "embedding" or "adalora"
    left: np.ndarray
    right: np.ndarray
    scaling: float
    rank: int
    alpha: float
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def delta(self) -> np.ndarray:
        """The dense update ``scaling * left @ right`` (float64)."""
        return self.scaling * (self.left @ self.right)


@dataclass
class Adapter:
    """An adapter folder's configuration and its adapted layers, sorted by module name."""

    path: Path
    peft_type: str
    config: dict
    layers: list[LayerUpdate]
    ignored_keys: list[str]


def read_adapter(path: str | Path) -> Adapter:
    """Load ``adapter_config.json`` and ``adapter_model.safetensors`` from ``path``."""
    folder = Path(path)
    config = _read_config(folder)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type not in ("LORA", "ADALORA"):
        raise AdapterReadError(
            f"{folder} holds a {peft_type} adapter; only LoRA-family adapters (LORA, ADALORA) have "
            "low-rank updates to inspect."
        )
    tensors = _read_tensors(folder)
    grouped, ignored = _group_lora_tensors(tensors)
    if not grouped:
        raise AdapterReadError(
            f"{folder / WEIGHTS_NAME} contains no LoRA tensors (no keys with lora_A / lora_B / "
            f"lora_embedding_A / lora_embedding_B); found e.g. {sorted(tensors)[:3]}."
        )
    build = _adalora_layer if peft_type == "ADALORA" else _lora_layer
    layers = [build(name, parts, config) for name, parts in sorted(grouped.items())]
    return Adapter(path=folder, peft_type=peft_type, config=config, layers=layers, ignored_keys=ignored)


def _read_config(folder: Path) -> dict:
    """``adapter_config.json`` through the library's reader; its errors become :class:`AdapterReadError`."""
    if not folder.exists():
        raise AdapterReadError(f"adapter folder not found: {folder}")
    if not folder.is_dir():
        raise AdapterReadError(
            f"{folder} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    try:
        return read_config_json(folder / CONFIG_NAME)
    except FileNotFoundError:
        nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
        hint = f" Adapters found in sub-folders: {', '.join(nested)}." if nested else ""
        raise AdapterReadError(
            f"{folder} has no {CONFIG_NAME}; pass a folder written by save_pretrained.{hint}"
        ) from None
    except (
        ValueError
    ) as error:  # not UTF-8, not JSON, or not an object; the message names the file and the fix
        raise AdapterReadError(str(error)) from error


def _read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """``adapter_model.safetensors`` through the library's reader (never a pickle), as float64 arrays."""
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        pickled = [name for name in _PICKLE_NAMES if (folder / name).exists()]
        hint = (
            f" Only {pickled[0]} (a pickle file) is there; lorakit does not read pickles. Re-save the adapter "
            "with save_pretrained(..., safe_serialization=True)."
            if pickled
            else ""
        )
        raise AdapterReadError(f"{weights_path} not found.{hint}")
    try:
        loaded = load_adapter_weights(folder)
    except (OSError, ValueError, RuntimeError) as error:
        # load_adapter_weights reports a corrupt file as a ValueError raised from the safetensors error
        reason = error.__context__ if isinstance(error.__context__, Exception) else error
        raise AdapterReadError(
            f"{weights_path} is not a readable safetensors file ({reason}); it may be truncated or corrupt. "
            "Save the adapter again or re-download it."
        ) from error
    return {key: tensor.detach().to(torch.float64).numpy() for key, tensor in loaded.items()}


def _group_lora_tensors(tensors: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    grouped: dict[str, dict[str, np.ndarray]] = {}
    ignored: list[str] = []
    for key, value in tensors.items():
        short = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        short = short[: -len(".weight")] if short.endswith(".weight") else short
        match = _KEY_PATTERN.match(short)
        if match is None:
            ignored.append(key)
            continue
        name = match["module"] + (f"[{match['adapter']}]" if match["adapter"] else "")
        grouped.setdefault(name, {})[match["part"]] = value
    return grouped, sorted(ignored)


def pattern_value(patterns: dict | None, module_name: str, default):
    """Value of the first key of ``patterns`` matching ``module_name`` (as a whole or a dotted suffix)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _lora_layer(name: str, parts: dict[str, np.ndarray], config: dict) -> LayerUpdate:
    notes: list[str] = []
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
        a, b = _require(name, parts, "lora_embedding_A", "lora_embedding_B")
        kind, left, right = "embedding", a.T, b.T  # (B @ A)^T = A^T @ B^T
        rank = a.shape[0]
    else:
        a, b = _require(name, parts, "lora_A", "lora_B")
        kind, left, right, rank = _linear_or_conv(name, a, b)
    module_name = re.sub(r"\[[^\]]*\]$", "", name)
    config_rank = int(pattern_value(config.get("rank_pattern"), module_name, config.get("r", _DEFAULT_R)))
    if config_rank != rank:
        notes.append(f"config rank {config_rank} differs from the stored rank {rank}; using {rank}")
    alpha = float(
        pattern_value(config.get("alpha_pattern"), module_name, config.get("lora_alpha", _DEFAULT_ALPHA))
    )
    use_rslora = bool(config.get("use_rslora", False))
    scaling = lora_scaling(alpha, rank, use_rslora)
    if "lora_magnitude_vector" in parts:
        notes.append("DoRA: delta is the LoRA part scaling*B@A; the magnitude vector is not included")
    return LayerUpdate(name, kind, left, right, scaling, rank, alpha, notes)


def _linear_or_conv(name: str, a: np.ndarray, b: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, int]:
    if a.ndim == 2 and b.ndim == 2:
        kind = "linear"
    elif a.ndim >= 3 and b.ndim == a.ndim and all(size == 1 for size in b.shape[2:]):
        kind = "conv"
    else:
        raise AdapterReadError(
            f"layer {name}: unsupported LoRA shapes lora_A {a.shape}, lora_B {b.shape} "
            "(expected (r, in) and (out, r), or conv kernels with a 1x1 lora_B)."
        )
    right = a.reshape(a.shape[0], -1)
    left = b.reshape(b.shape[0], b.shape[1])
    if left.shape[1] != right.shape[0]:
        raise AdapterReadError(
            f"layer {name}: lora_B {b.shape} does not fit lora_A {a.shape} (ranks differ)."
        )
    return kind, left, right, right.shape[0]


def _adalora_layer(name: str, parts: dict[str, np.ndarray], config: dict) -> LayerUpdate:
    a, b = _require(name, parts, "lora_A", "lora_B")
    if "lora_E" not in parts:
        raise AdapterReadError(
            f"AdaLoRA layer {name} has no lora_E (singular values); the file is incomplete."
        )
    e = parts["lora_E"].reshape(-1, 1)
    if not (a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1] == e.shape[0]):
        raise AdapterReadError(
            f"AdaLoRA layer {name}: shapes lora_A {a.shape}, lora_E {e.shape}, lora_B {b.shape} do not fit."
        )
    init_r = int(config.get("init_r") or a.shape[0])
    alpha = float(config.get("lora_alpha", _DEFAULT_ALPHA))
    base_scaling = alpha if alpha > 0 else float(init_r)
    scaling = base_scaling / (init_r + 1e-5)
    notes = [f"AdaLoRA: kept {a.shape[0]} of {init_r} initial ranks"] if a.shape[0] != init_r else []
    return LayerUpdate(name, "adalora", b, a * e, scaling, a.shape[0], alpha, notes)


def _require(
    name: str, parts: dict[str, np.ndarray], first: str, second: str
) -> tuple[np.ndarray, np.ndarray]:
    missing = [part for part in (first, second) if part not in parts]
    if missing:
        raise AdapterReadError(
            f"layer {name} has no {' / '.join(missing)} tensor; the adapter file is incomplete."
        )
    return parts[first], parts[second]
