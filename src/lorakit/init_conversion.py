"""A trained PiSSA / OLoRA adapter as a plain LoRA adapter over the original base weights.

PiSSA and OLoRA (:mod:`lorakit.initializers`) start from factors of the base weight and replace the base weight by
the residual, so their adapter only works on top of that residual. ``PeftModel.save_pretrained(...,
path_initial_model_for_weight_conversion=folder)`` (PEFT's argument, PEFT 0.21.2's semantics) saves instead a plain
LoRA adapter of twice the rank that gives the same model on the *original* base model; ``folder`` holds the
initial, untrained adapter, saved right after ``get_peft_model`` and before any training.

PEFT differences, on purpose: the initial folder is only read (PEFT rewrites its ``adapter_config.json`` with
``init_lora_weights=True``); biases and ``modules_to_save`` weights are kept in the converted file and embedding
factors (``lora_embedding_A`` / ``lora_embedding_B``) are converted too (PEFT keeps only ``lora_A`` / ``lora_B``
keys, so its converted file loses them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lorakit.config import CONFIG_NAME, LoraConfig, PeftType, load_adapter_config, read_config_json
from lorakit.initializers import parse_init
from lorakit.saving import save_adapters
from lorakit.serialization import WEIGHTS_NAME, load_adapter_weights, save_adapter_weights
from lorakit.state_dict import get_peft_model_state_dict

__all__ = ["convert_to_lora", "converted_config_fields", "save_converted"]

# The factor tensors of a file key (its last components), and the dimension that holds the rank.
_RANK_DIM = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}


def _factor(key: str) -> str | None:
    """``"lora_A"``, ``"lora_B"``, ``"lora_embedding_A"`` or ``"lora_embedding_B"`` for a factor key, else None."""
    parts = key.split(".")
    last = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    return last if last in _RANK_DIM else None


def convert_to_lora(
    trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The tensors of a plain LoRA adapter over ``W`` equal to a trained PiSSA / OLoRA adapter over ``W_res``.

    PiSSA / OLoRA start at ``W = W_res + s B0 A0`` and train to ``W_res + s B A``, i.e. ``W + s (B A - B0 A0)``;
    with ``A' = [A; A0]`` (rows: rank ``2r``) and ``B' = [B, -B0]`` (columns)::

        B' A' = B A - B0 A0

    so ``A'``, ``B'`` at rank ``2r`` with the same scaling ``s`` (``lora_alpha`` doubled; with rsLoRA multiplied
    by ``sqrt(2)``, see :func:`converted_config_fields`) give the trained model on the original weights. This is
    PEFT's ``LoraModel.subtract_mutated_init``. ``trained`` and ``initial`` are adapter files' tensors (keys as
    in ``adapter_model.safetensors``); every factor (``lora_A`` / ``lora_B``, also of convolutions, and
    ``lora_embedding_A`` / ``lora_embedding_B``, stacked along their rank dimension) must be in both with the
    same shape; any other tensor (trained biases, ``modules_to_save`` weights) is kept as trained.
    Raises ``ValueError`` when the two adapters' factors differ in keys or shapes.
    """
    trained_factors = {k for k in trained if _factor(k)}
    initial_factors = {k for k in initial if _factor(k)}
    if trained_factors != initial_factors:
        only_trained = sorted(trained_factors - initial_factors)[:3]
        only_initial = sorted(initial_factors - trained_factors)[:3]
        raise ValueError(
            "The initial adapter does not have the trained adapter's layers: "
            f"only in the trained one {only_trained}, only in the initial one {only_initial}. Pass the folder saved "
            "from this adapter right after get_peft_model."
        )
    converted = {}
    for key, tensor in trained.items():
        factor = _factor(key)
        if factor is None:
            converted[key] = tensor
            continue
        start = initial[key]
        if start.shape != tensor.shape:
            raise ValueError(
                f"{key}: the initial adapter's tensor has shape {tuple(start.shape)}, the trained one "
                f"{tuple(tensor.shape)}; the initial folder is from another adapter (rank or model)."
            )
        start = start.to(device=tensor.device, dtype=tensor.dtype)
        if factor.endswith("B"):
            start = -start
        converted[key] = torch.cat([tensor, start], dim=_RANK_DIM[factor])
    return converted


def converted_config_fields(config: LoraConfig) -> dict:
    """The config fields of the converted adapter: rank doubled with the same scaling.

    ``r``, ``rank_pattern`` and (without rsLoRA) ``lora_alpha`` and ``alpha_pattern`` doubled (``2 alpha / 2r``);
    with rsLoRA ``lora_alpha`` times ``sqrt(2)`` (``sqrt(2) alpha / sqrt(2r)``); ``init_lora_weights=True`` so that
    loading it adds a plain adapter without touching the base weights. rsLoRA with ``rank_pattern`` or
    ``alpha_pattern`` raises ``ValueError``, as in PEFT (a doubled per-module alpha would be wrong there).
    """
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "path_initial_model_for_weight_conversion is not supported when rank_pattern or alpha_pattern is "
            "used together with use_rslora=True."
        )
    return {
        "r": 2 * config.r,
        "lora_alpha": config.lora_alpha * 2**0.5 if config.use_rslora else 2 * config.lora_alpha,
        "rank_pattern": {key: 2 * value for key, value in config.rank_pattern.items()},
        "alpha_pattern": {key: 2 * value for key, value in config.alpha_pattern.items()},
        "init_lora_weights": True,
    }


def _kind(init) -> str | None:
    """``"pissa"`` (any ``pissa_niter_K`` too) or ``"olora"``; None for any other (or an invalid) init."""
    try:
        kind = parse_init(init)[0]
    except ValueError:
        return None
    return kind if kind in ("pissa", "olora") else None


def _check_convertible(config, name: str) -> None:
    if config.peft_type != PeftType.LORA:
        raise ValueError(
            f"Adapter {name!r} is a {config.peft_type.value} adapter; path_initial_model_for_weight_conversion "
            "converts PiSSA / OLoRA LoRA adapters only."
        )
    if _kind(config.init_lora_weights) is None:
        raise ValueError(
            f"Adapter {name!r} has init_lora_weights={config.init_lora_weights!r}; "
            "path_initial_model_for_weight_conversion converts PiSSA ('pissa', 'pissa_niter_K') and OLoRA "
            "adapters, whose base weights are residuals. Save other adapters without it."
        )
    if config.use_dora:
        raise ValueError(
            f"Adapter {name!r} uses DoRA: its update is not B A alone, so it cannot be rewritten as the "
            "difference of two LoRA updates. Save it without path_initial_model_for_weight_conversion."
        )


def _load_initial(path: str | os.PathLike, configs: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """The initial adapter's tensors, after checking that the folder holds a PiSSA / OLoRA adapter."""
    directory = Path(path)
    if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ValueError(
            f"path_initial_model_for_weight_conversion={str(path)!r} is not an adapter folder (it needs "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}): save the adapter right after get_peft_model, before training, "
            "and pass that folder."
        )
    try:
        initial = load_adapter_config(directory)
    except (OSError, ValueError) as error:
        raise ValueError(f"Cannot read the initial adapter's config in {directory}: {error}") from None
    init = initial.init_lora_weights
    # True: PEFT's recipe sets init_lora_weights=True before saving the initial adapter (so that loading it does
    # not decompose the base weight again); the factors are still the PiSSA / OLoRA ones.
    if initial.peft_type != PeftType.LORA or (init is not True and _kind(init) is None):
        raise ValueError(
            f"The adapter in {directory} is not a PiSSA / OLoRA adapter (peft_type {initial.peft_type.value}, "
            f"init_lora_weights={init!r}); path_initial_model_for_weight_conversion needs the PiSSA / OLoRA "
            "adapter as saved before training."
        )
    for name in names:
        if init is not True and _kind(init) != _kind(configs[name].init_lora_weights):
            raise ValueError(
                f"The initial adapter in {directory} was made with init_lora_weights={init!r}, adapter {name!r} "
                f"with {configs[name].init_lora_weights!r}: it is not this adapter's initial state."
            )
    return load_adapter_weights(directory)


def save_converted(
    peft_model: nn.Module,
    save_directory: str | os.PathLike,
    initial_path: str | os.PathLike,
    selected_adapters: list[str] | None,
    save_embedding_layers: bool | str,
    is_main_process: bool,
    state_dict: dict[str, torch.Tensor] | None,
) -> None:
    """``save_pretrained`` with ``path_initial_model_for_weight_conversion``: every selected adapter is saved as
    the plain LoRA adapter of :func:`convert_to_lora` with the config of :func:`converted_config_fields`.

    Everything is checked and converted before anything is written; the live adapters and their configs do not
    change, and the initial folder is only read.
    """
    configs = peft_model.peft_config
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    for name in names:
        if name in configs:  # unknown names: save_adapters raises, naming them
            _check_convertible(configs[name], name)
            converted_config_fields(configs[name])  # rsLoRA with patterns raises
    if save_embedding_layers is True:
        raise ValueError(
            "save_embedding_layers=True cannot be combined with path_initial_model_for_weight_conversion: a "
            "PiSSA / OLoRA output embedding holds the residual, not the original weights."
        )
    if not is_main_process:
        save_adapters(peft_model, save_directory, names, save_embedding_layers, False, state_dict)
        return
    initial = _load_initial(initial_path, configs, [n for n in names if n in configs])
    converted = {
        name: convert_to_lora(get_peft_model_state_dict(peft_model, state_dict, name), initial)
        for name in names
        if name in configs
    }
    save_adapters(peft_model, save_directory, names, save_embedding_layers, True, state_dict)
    root = Path(save_directory)
    for name, tensors in converted.items():
        directory = root if name == "default" else root / name
        save_adapter_weights(tensors, directory)
        written = read_config_json(directory / CONFIG_NAME)
        config = type(configs[name]).from_dict({**written, **converted_config_fields(configs[name])})
        config.save_pretrained(directory, auto_mapping_dict=written.get("auto_mapping"))
