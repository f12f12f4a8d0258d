"""``load_model`` / ``load_tokenizer``: the embedded default, a local folder, a ``.gguf`` file or a Hub id.

Every source ends as a folder that transformers' ``from_pretrained`` reads: GGUF files (the embedded
SmolLM2-135M-Instruct included) are converted once to safetensors in lorakit's cache (``gguf_cache``).
Weights are only ever read from safetensors (``use_safetensors=True``): a folder that only has pickle
checkpoints (``pytorch_model.bin``) is refused, and no remote code is run.

A loaded model's ``config.name_or_path`` (which adapters record as ``base_model_name_or_path``) names the
source portably (:func:`recorded_name`): the Hub id for the embedded model, an absolute path for a folder or
``.gguf`` file, the id itself for a Hub model; never lorakit's cache folder or a relative path.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lorakit.models.embedded import (
    EMBEDDED_CACHE_NAME,
    EMBEDDED_HUB_ID,
    EMBEDDED_HUB_ID_NOTICE,
    embedded_gguf_path,
    is_default_model,
    is_embedded_hub_id,
)
from lorakit.models.errors import ModelLoadError, ModelNotFoundError
from lorakit.models.gguf_cache import cache_folder_name, cache_root, ensure_converted, gguf_fingerprint

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: kind is ``embedded``, ``gguf``, ``folder`` or ``hub``."""

    kind: str
    location: str
    gguf_path: Path | None = None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.lower().endswith(".gguf")
    )


def resolve_source(name_or_path: str | Path | None) -> ModelSource:
    """Classify ``name_or_path`` without loading anything (raises for missing paths and invalid names).

    An existing local file or folder comes first, as in transformers: a folder that happens to be named
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` (or ``smollm2``) is that folder, not the embedded model.
    """
    if name_or_path is None:
        return ModelSource("embedded", "smollm2", embedded_gguf_path())
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists() and is_default_model(name_or_path):
        return ModelSource("embedded", "smollm2", embedded_gguf_path())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{path} is a file but not a .gguf model. Pass a model folder (config.json + *.safetensors), "
                "a .gguf file, a Hugging Face Hub id, or 'smollm2' for the embedded default."
            )
        return ModelSource("gguf", str(path), path.resolve())
    if path.is_dir():
        return _folder_source(path)
    if _looks_like_path(name_or_path) or not _HUB_ID.match(name_or_path):
        raise ModelNotFoundError(
            f"Model not found: {name_or_path!r} is neither an existing folder or .gguf file nor a Hugging Face "
            "Hub id (owner/name). Check the path, or use 'smollm2' for the embedded default model."
        )
    return ModelSource("hub", name_or_path)


def _folder_source(path: Path) -> ModelSource:
    if (path / "config.json").is_file():
        return ModelSource("folder", str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(ggufs[0]), ggufs[0].resolve())
    found = ", ".join(p.name for p in ggufs) if ggufs else "no config.json and no .gguf file"
    raise ModelLoadError(
        f"{path} is not a model folder ({found}). A model folder holds config.json and *.safetensors "
        "(as written by save_pretrained); to load a GGUF, pass the path of the .gguf file itself."
    )


def model_folder(name_or_path: str | Path | None = None, *, cache_dir: str | Path | None = None) -> str:
    """The folder or Hub id that ``from_pretrained`` loads for ``name_or_path`` (converting a GGUF once)."""
    return _source_folder(resolve_source(name_or_path), cache_dir)


def _source_folder(source: ModelSource, cache_dir: str | Path | None) -> str:
    if source.gguf_path is None:
        return source.location
    root = cache_root(cache_dir) / "models"
    if source.kind == "embedded":
        target = root / EMBEDDED_CACHE_NAME
    else:
        target = root / cache_folder_name(source.gguf_path, gguf_fingerprint(source.gguf_path))
    return str(ensure_converted(source.gguf_path, target, say=_say))


def recorded_name(source: ModelSource) -> str:
    """The portable name of ``source``: Hub id (embedded model, Hub model) or absolute path (folder, GGUF)."""
    if source.kind == "embedded":
        return EMBEDDED_HUB_ID
    if source.kind == "gguf" and source.gguf_path is not None:
        return str(source.gguf_path)
    if source.kind == "folder":
        return str(Path(source.location).expanduser().resolve())
    return source.location


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file, checked against the file's size.

    The format is an 8-byte little-endian header length, the JSON header, then the tensor bytes at the
    header's ``data_offsets``. Raises :class:`ModelLoadError` naming the file when it is empty, truncated
    (the tensors end past the end of the file) or not safetensors at all.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8:
            raise _corrupt(path, f"{size} bytes, not even the 8-byte header length" if size else "empty")
        if length > size - 8:
            raise _corrupt(path, f"its header length reads {length:,} bytes in a file of {size:,} bytes")
        try:
            header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise _corrupt(path, "its header is not a safetensors header") from None
    if 8 + length + max(ends, default=0) > size:
        raise _corrupt(path, f"{size} bytes, but its tensors need {8 + length + max(ends)}")
    return header


def _corrupt(path: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(
        f"{path} is corrupt or truncated ({detail}). Download or save the model again (an interrupted "
        "download or copy leaves such files)."
    )


def check_weight_files(folder: str | Path) -> None:
    """Check the header of every ``*.safetensors`` file of a local model folder (nothing for a Hub id)."""
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        safetensors_header(path)


def _safetensors_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype holding most elements in the folder's ``*.safetensors`` headers (None if none)."""
    elements: Counter[str] = Counter()
    for path in sorted(folder.glob("*.safetensors")):
        header = safetensors_header(path)
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                count = 1
                for size in entry.get("shape", []):
                    count *= size
                elements[entry["dtype"]] += count
    return _SAFETENSORS_DTYPES[elements.most_common(1)[0][0]] if elements else None


def stored_dtype(
    name_or_path: str | Path | None = None, *, cache_dir: str | Path | None = None
) -> torch.dtype:
    """The dtype a model's weights are stored in: the safetensors headers of a folder (GGUFs: their
    converted cache folder, fp32), else the config's ``dtype`` / ``torch_dtype``, else fp32."""
    from transformers import AutoConfig

    folder = _source_folder(resolve_source(name_or_path), cache_dir)
    if Path(folder).is_dir():
        found = _safetensors_dtype(Path(folder))
        if found is not None:
            return found
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise _pretrained_error("model config", str(name_or_path or "smollm2"), error) from error
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.float32


def _pretrained_error(what: str, name: str, error: Exception) -> ModelLoadError:
    text = str(error)
    if "safetensors" in text.lower() or "pytorch_model.bin" in text:
        hint = "lorakit only reads safetensors weights (never pickle files such as pytorch_model.bin)."
    else:
        hint = "Check the name or path; Hub ids need network access to huggingface.co or a local HF cache."
    return ModelLoadError(f"Could not load the {what} {name!r}: {text.strip()} {hint}")


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    load_in_4bit: bool = False,
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """A causal language model (transformers ``PreTrainedModel``) in ``dtype``, in eval mode.

    ``name_or_path``: None or ``"smollm2"`` = the embedded SmolLM2-135M-Instruct; else a folder, a ``.gguf``
    file or a Hub id. ``load_in_4bit`` replaces the Linear layers (except ``lm_head``) by NF4
    ``lorakit.quant.Linear4bit`` layers that compute in ``compute_dtype`` (QLoRA, Dettmers et al. 2023 sec. 3).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_source(name_or_path)
    if source.kind == "embedded" and is_embedded_hub_id(None if name_or_path is None else str(name_or_path)):
        _say(EMBEDDED_HUB_ID_NOTICE)  # e.g. an adapter's recorded base: say which weights these are
    folder = _source_folder(source, cache_dir)
    check_weight_files(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise _pretrained_error("model", str(name_or_path or "smollm2"), error) from error
    model.config.name_or_path = recorded_name(source)  # what an adapter records as its base
    if device is not None:
        model.to(device)
    if load_in_4bit:
        from lorakit.quant import quantize_model

        model = quantize_model(model, compute_dtype=compute_dtype)
    return model.eval()


def load_tokenizer(name_or_path: str | Path | None = None, *, cache_dir: str | Path | None = None) -> Any:
    """The tokenizer that belongs to :func:`load_model` ``(name_or_path)`` (same sources, same cache)."""
    from transformers import AutoTokenizer

    folder = model_folder(name_or_path, cache_dir=cache_dir)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise _pretrained_error("tokenizer", str(name_or_path or "smollm2"), error) from error
