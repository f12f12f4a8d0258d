"""PEFT's state-dict functions: an adapter's tensors in the file layout, loading such tensors back, and the base
model's own state dict with the adapters taken out.

* :func:`get_peft_model_state_dict` gives the tensors ``save_pretrained`` writes: ``base_model.model.<path>.lora_A
  .weight`` (adapter name dropped) for a :class:`~lorakit.peft_model.PeftModel`, ``<path>.lora_A.weight`` for a
  plain model with injected layers (:func:`lorakit.inject_adapter_in_model`).
* :func:`set_peft_model_state_dict` puts such tensors into an adapter and returns ``load_state_dict``'s result
  (``missing_keys`` lists every model key not in the given dict, base weights included; ``unexpected_keys`` the
  given keys the model does not have), exactly as PEFT does. It is lenient, like PEFT's; ``from_pretrained`` and
  ``load_adapter`` are strict instead (see :mod:`lorakit.serialization`).
* :func:`get_base_model_state_dict` / :func:`set_base_model_state_dict`: the wrapped model's state dict under its
  original key names (no ``base_layer`` / ``original_module`` infixes, no adapter tensors).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit.inject import ModulesToSaveWrapper
from lorakit.serialization import adapter_key_map, embedding_state_keys
from lorakit.tuner import BaseTuner
from lorakit.tuner_layer import BaseTunerLayer

PEFT_PREFIX = "base_model.model."
# Infixes that DDP, torch.compile, FSDP and activation checkpointing add to state-dict keys of a wrapped model.
_WRAPPER_INFIXES = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _config_of(model: nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        existing = list(configs) if isinstance(configs, dict) else []
        raise ValueError(
            f"The model has no adapter named {adapter_name!r} (adapters: {existing or 'none'}); pass a model made "
            f"by get_peft_model, PeftModel.from_pretrained or inject_adapter_in_model."
        )
    return configs[adapter_name]


def _normalized(key: str) -> str:
    key = key.removeprefix("module.")
    for infix in _WRAPPER_INFIXES:
        key = key.replace(infix, "")
    return key


class _Lookup:
    """Find a live-model key in a state dict given by the caller, which may come from a wrapper of the model."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.state_dict = state_dict
        self._index: dict[str, str] | None = None

    def __call__(self, key: str) -> torch.Tensor:
        if key in self.state_dict:
            return self.state_dict[key]
        if self._index is None:
            self._index = {_normalized(k): k for k in self.state_dict}
        for candidate in (key, key.removeprefix(PEFT_PREFIX), key.removeprefix("base_model.")):
            found = self._index.get(_normalized(candidate))
            if found is not None:
                return self.state_dict[found]
        example = next(iter(self.state_dict), "(empty)")
        raise ValueError(
            f"The state_dict passed has no tensor for {key!r} (its keys look like {example!r}). Pass the full "
            f"state dict of this PeftModel (or of a DDP / FSDP / compile wrapper around it)."
        )


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors of adapter ``adapter_name`` keyed as in PEFT's ``adapter_model.safetensors``.

    Args:
        model: a PeftModel, or a plain model with injected adapters (keys then have no ``base_model.model.``).
        state_dict: take the tensors from this state dict of the model (e.g. gathered by transformers' Trainer
            under DDP / FSDP / DeepSpeed) instead of from the live modules; keys may carry the wrappers' infixes.
        adapter_name: the adapter whose tensors to return.
        unwrap_compiled: use ``model._orig_mod`` of a ``torch.compile``-d model.
        save_embedding_layers: ``True`` adds the full input / output embedding weights, as PEFT does. ``"auto"``
            and ``False`` leave them out (PEFT's ``"auto"`` adds them when an embedding is targeted; lorakit does
            not, as the base embedding is unchanged by training).
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    config = _config_of(model, adapter_name)
    mapping = adapter_key_map(model, adapter_name, getattr(config, "bias", "none"))
    if save_embedding_layers is True:
        mapping.update({key: key for key in embedding_state_keys(model)})
    source = _Lookup(state_dict) if state_dict is not None else model.state_dict().__getitem__
    tensors = {saved: source(key) for saved, key in mapping.items()}
    finalize = getattr(_tuner(model), "adapter_tensors_for_saving", None)
    if finalize is not None:  # AdaLoRA: keep only the unpruned triplets
        tensors = finalize(tensors, adapter_name)
    return tensors


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> _IncompatibleKeys:
    """Load tensors keyed as in PEFT's files into adapter ``adapter_name``; returns the load result.

    Keys of the adapter's own tensors get the adapter name put back; any other key is loaded as it is (a base
    embedding saved with ``save_embedding_layers``, a trained bias). A shape mismatch raises ``RuntimeError``
    unless ``ignore_mismatched_sizes``, which skips those tensors with a warning. ``low_cpu_mem_usage`` is
    accepted for PEFT's signature; lorakit never creates adapters on the meta device, so there is nothing to do.
    """
    config = _config_of(model, adapter_name)
    mapping = adapter_key_map(model, adapter_name, getattr(config, "bias", "none"))
    model_keys = model.state_dict()
    prefixed = any(key.startswith(PEFT_PREFIX) for key in model_keys)
    if not prefixed:  # layers injected into a plain model: the file keys still carry PEFT's prefix
        mapping.update({PEFT_PREFIX + saved: key for saved, key in mapping.items()})
    converted = {mapping.get(key, key): value for key, value in peft_model_state_dict.items()}
    if not prefixed:
        converted = {key.removeprefix(PEFT_PREFIX): value for key, value in converted.items()}
    if ignore_mismatched_sizes:
        mismatched = [
            (key, tuple(value.shape), tuple(model_keys[key].shape))
            for key, value in converted.items()
            if key in model_keys and tuple(value.shape) != tuple(model_keys[key].shape)
        ]
        for key, _, _ in mismatched:
            del converted[key]
        if mismatched:
            details = "\n".join(
                f"- {k}: found shape {a} in the checkpoint and {b} in the model" for k, a, b in mismatched
            )
            warnings.warn(
                f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and are "
                f"being ignored because you passed `ignore_mismatched_sizes=True`: {details}.",
                stacklevel=2,
            )
    return model.load_state_dict(converted, strict=False)


# ------------------------------------------------------------------------------------------- base model state
def _tuner(model: nn.Module) -> BaseTuner | None:
    tuner = getattr(model, "base_model", None)  # a PeftModel's; a transformers model's is its inner model
    return tuner if isinstance(tuner, BaseTuner) else None


def _inner_model(model: nn.Module) -> nn.Module:
    tuner = _tuner(model)
    return tuner.model if tuner is not None else model


def _wrapper_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(tuner-layer names, modules_to_save-wrapper names) in ``model``."""
    tuner = _tuner(model)
    inner = _inner_model(model)
    if tuner is not None:
        layers = {name for name, _ in tuner.adapter_layers()}
    else:
        layers = {name for name, module in inner.named_modules() if isinstance(module, BaseTunerLayer)}
    wrappers = {name for name, module in inner.named_modules() if isinstance(module, ModulesToSaveWrapper)}
    return layers, wrappers


def _original_key(key: str, layers: set[str], wrappers: set[str]) -> str | None:
    """``key`` without lorakit's infixes, or None if it is an adapter's tensor."""
    path, kept = "", []
    for part in key.split("."):
        if path in layers and part != "base_layer":
            return None  # lora_A, lora_dropout, ... of a tuner layer
        if path in wrappers and part == "modules_to_save":
            return None
        if not (
            (path in layers and part == "base_layer") or (path in wrappers and part == "original_module")
        ):
            kept.append(part)
        path = f"{path}.{part}" if path else part
    return ".".join(kept)


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped model's state dict under its original keys, without any adapter tensor (as PEFT's).

    Merged adapters are part of the base weights, as in PEFT.
    """
    layers, wrappers = _wrapper_names(model)
    result = {}
    for key, value in _inner_model(model).state_dict().items():
        original = _original_key(key, layers, wrappers)
        if original is not None:
            result[original] = value
    return result


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> _IncompatibleKeys:
    """Load a state dict under the original (pre-adapter) keys into the wrapped model's base weights.

    With ``strict`` a missing or unexpected key raises ``RuntimeError``, as ``nn.Module.load_state_dict``.
    """
    layers, wrappers = _wrapper_names(model)
    inner = _inner_model(model)
    to_live = {}
    for key in inner.state_dict():
        original = _original_key(key, layers, wrappers)
        if original is not None:
            to_live[original] = key
    unexpected = [key for key in state_dict if key not in to_live]
    missing = [key for key in to_live if key not in state_dict]
    if strict and (missing or unexpected):
        messages = [f"Missing key(s) in state_dict: {missing}"] if missing else []
        messages += [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else []
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(messages))
    inner.load_state_dict({to_live[k]: v for k, v in state_dict.items() if k in to_live}, strict=False)
    return _IncompatibleKeys(missing, unexpected)
