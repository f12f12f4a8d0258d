"""``PeftModel.save_pretrained`` / ``load_adapter`` behind the methods: adapter folders in PEFT's layout.

A folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` for the ``default`` adapter and one
sub-folder per other adapter, plus a ``README.md`` model card (:mod:`lorakit.model_card`). lorakit writes
safetensors only: ``safe_serialization=False`` (PEFT's pickle ``adapter_model.bin``) is refused, because loading
a pickle file can run arbitrary code, and every PEFT version reads the safetensors file anyway.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from lorakit.config import CONFIG_NAME, looks_like_repo_id
from lorakit.model_card import base_model_name, create_or_update_model_card
from lorakit.serialization import WEIGHTS_NAME, load_adapter_weights, save_adapter_weights
from lorakit.state_dict import PEFT_PREFIX, get_peft_model_state_dict

PICKLE_REFUSED = (
    "safe_serialization=False asks for a pickle file (adapter_model.bin), which lorakit never writes: loading a "
    "pickle can run arbitrary code. lorakit saves adapter_model.safetensors, which PEFT (every version) and "
    "transformers read too; call save_pretrained without safe_serialization (or with True)."
)
_HUB_KWARGS = ("revision", "token", "cache_dir", "subfolder", "local_files_only")


def resolve_adapter_dir(model_id: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> Path:
    """A local folder (or its ``subfolder``) as is; otherwise download the adapter files from the Hugging Face Hub."""
    path = Path(model_id) / subfolder if subfolder else Path(model_id)
    if path.is_dir():
        return path
    if path.exists() or os.sep in str(model_id) and not looks_like_repo_id(str(model_id)):
        raise FileNotFoundError(f"Adapter folder {path} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        names = [CONFIG_NAME, WEIGHTS_NAME]
        patterns = [f"{subfolder}/{n}" for n in names] if subfolder else names
        allowed = {k: v for k, v in hub_kwargs.items() if k in _HUB_KWARGS and k != "subfolder"}
        local = Path(snapshot_download(str(model_id), allow_patterns=patterns, **allowed))
    except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise FileNotFoundError(
            f"{model_id} is not a local folder and could not be fetched from the Hugging Face Hub ({error})."
        ) from None
    return local / subfolder if subfolder else local


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | None = None,
    key_mapping: dict[str, str] | None = None,
    allow_pickle: bool = False,
    **hub_kwargs,
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder (or Hub repo), keyed as in the file; PEFT's ``load_peft_weights``."""
    directory = resolve_adapter_dir(model_id, **hub_kwargs)
    tensors = remap_keys(load_adapter_weights(directory, allow_pickle=allow_pickle), key_mapping)
    return tensors if device is None else {k: v.to(device) for k, v in tensors.items()}


def remap_keys(
    tensors: dict[str, torch.Tensor], key_mapping: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    """PEFT's ``key_mapping``: regex -> replacement on the key without ``base_model.model.``; first match wins."""
    if not key_mapping:
        return tensors
    remapped = {}
    for key, value in tensors.items():
        prefix = (
            PEFT_PREFIX
            if key.startswith(PEFT_PREFIX)
            else "base_model."
            if key.startswith("base_model.")
            else ""
        )
        bare = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            bare, count = re.subn(pattern, replacement, bare)
            if count:
                break
        remapped[prefix + bare] = value
    return remapped


def save_adapters(
    peft_model: nn.Module,
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None,
    save_embedding_layers: bool | str,
    is_main_process: bool,
    state_dict: dict[str, torch.Tensor] | None,
) -> None:
    """Check everything first (so a refused save leaves no half-written folder), then write card and adapters."""
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; save_pretrained needs a folder path.")
    peft_model.base_model._check_not_unloaded("save_pretrained")
    configs = peft_model.peft_config
    if not configs:
        raise ValueError(
            "This model has no adapter left to save (the last one was deleted with delete_adapter); add or load "
            "an adapter first."
        )
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"Unknown adapter(s) {unknown}; existing: {list(configs)}.")
    if not is_main_process:
        return
    live = peft_model.state_dict() if state_dict is not None else None
    outputs = {}
    for name in names:
        tensors = get_peft_model_state_dict(
            peft_model, state_dict, name, save_embedding_layers=save_embedding_layers
        )
        if not tensors:
            raise ValueError(
                f"Adapter {name!r} has no weights in this model (no layer holds it), so there is nothing to save."
            )
        if state_dict is not None:
            _check_shapes(peft_model, tensors, name, live)
        outputs[name] = tensors
    root.mkdir(parents=True, exist_ok=True)
    create_or_update_model_card(peft_model, root)
    for name, tensors in outputs.items():
        directory = root if name == "default" else root / name
        save_adapter_weights(tensors, directory)
        _save_config(peft_model, configs[name], directory)


def _check_shapes(peft_model: nn.Module, tensors: dict, name: str, live: dict[str, torch.Tensor]) -> None:
    """A gathered state dict must hold whole tensors: a ZeRO-3 / FSDP shard would save an unloadable adapter."""
    reference = get_peft_model_state_dict(peft_model, live, name)
    for key, tensor in tensors.items():
        expected = reference.get(key)
        if expected is not None and tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"The state_dict passed to save_pretrained has {key!r} of shape {tuple(tensor.shape)}, but the "
                f"adapter's tensor has shape {tuple(expected.shape)}: it looks like a shard. Gather the full "
                f"parameters first (DeepSpeed ZeRO-3: stage3_gather_16bit_weights_on_model_save; FSDP: a full "
                f"state dict)."
            )


def _save_config(peft_model: nn.Module, config, directory: Path) -> None:
    """The config as PEFT writes it: ``inference_mode`` true, ``auto_mapping`` when there is no task type."""
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = base_model_name(peft_model.get_base_model())
    auto_mapping = None
    if getattr(config, "task_type", None) is None:
        base_cls = type(peft_model.get_base_model())
        auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    saved_mode, config.inference_mode = config.inference_mode, True
    try:
        config.save_pretrained(directory, auto_mapping_dict=auto_mapping)
    finally:
        config.inference_mode = saved_mode
