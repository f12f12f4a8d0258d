"""``PeftModel`` and ``get_peft_model``: the public face of an adapted model, with PEFT's API.

``PeftModel(model)`` behaves like ``model`` (forward, generate, config, ``.to(device)``) and adds the adapter
operations. Its parameters are named ``base_model.model.<path>`` as in PEFT, and its folders are PEFT's:
``adapter_config.json`` + ``adapter_model.safetensors``, the ``default`` adapter at the top of the folder and any
other adapter in a sub-folder named after it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import types
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from lorakit.config import LoraConfig, PeftType, load_config
from lorakit.serialization import (
    adapter_state_dict,
    load_adapter_weights,
    load_into_model,
    save_adapter_weights,
)
from lorakit.tuner import LoraModel

# Tuner class per method; AdaLoRA and the bottleneck Adapter register theirs (see lorakit.config).
TUNERS: dict[PeftType, type[nn.Module]] = {PeftType.LORA: LoraModel}


def register_tuner(peft_type: PeftType, tuner_cls: type[nn.Module]) -> None:
    TUNERS[peft_type] = tuner_cls


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


class PeftModel(nn.Module):
    """A model with adapters. Attribute access falls through to the wrapped model (``model.config`` etc.)."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("This model already has adapters; use add_adapter() to add another one.")
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _base_model_name(model)
        tuner_cls = TUNERS.get(peft_config.peft_type)
        if tuner_cls is None:
            raise ValueError(f"No tuner registered for {peft_config.peft_type}.")
        self.base_model = tuner_cls(model, peft_config, adapter_name)
        self.forward = types.MethodType(_forward_with_signature_of(model), self)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.get_base_model().generate(*args, **kwargs)
        with self.base_model.mixed_batch(adapter_names):
            return self.get_base_model().generate(*args, **kwargs)

    # ------------------------------------------------------------------------------------------ inspection
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    def get_base_model(self) -> nn.Module:
        """The wrapped model itself (with the LoRA layers in it)."""
        return self.base_model.model

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` the wrapped model in place (its LoRA layers are traced with it).

        Arguments are ``torch.compile``'s. The wrapper's own dispatch (``adapter_names``, disabling) stays
        eager, state-dict keys do not change, and under compilation the LoRA update is traced as the plain
        formula ``base + s * (dropout(x) A^T) B^T`` (the eager path's shared-mask and in-place tricks would
        break the graph), which the compiler fuses by itself. Fixed shapes (``packing``) avoid recompiling.
        """
        self.get_base_model().compile(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit weight counts as its number of weights."""
        trainable, total = 0, 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        for module in self.modules():
            if hasattr(module, "dequantize") and hasattr(module, "in_features"):
                total += module.in_features * module.out_features
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = _base_model_name(self.get_base_model())
        self.base_model.add_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---------------------------------------------------------------------------------------- save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **_ignored,
    ) -> None:
        """Write each adapter's config and weights; ``default`` at the top, others in ``<dir>/<name>/``."""
        if not is_main_process:
            return
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root} is a file; save_pretrained needs a folder path.")
        names = selected_adapters or list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; existing: {list(self.peft_config)}.")
        for name in names:
            config = self.peft_config[name]
            directory = root if name == "default" else root / name
            tensors = adapter_state_dict(self, name, config.bias)
            finalize = getattr(
                self.base_model, "adapter_tensors_for_saving", None
            )  # AdaLoRA: drop pruned ranks
            if finalize is not None:
                tensors = finalize(tensors, name)
            save_adapter_weights(tensors, directory)
            saved_mode, config.inference_mode = config.inference_mode, True
            try:
                config.save_pretrained(directory)
            finally:
                config.inference_mode = saved_mode

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        allow_pickle: bool = False,
        **_ignored,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter saved in ``model_id`` (a folder, or a Hub repo id)."""
        directory = resolve_adapter_dir(model_id)
        config = config if config is not None else load_config(directory)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name)
        peft_model._load_weights(directory, adapter_name, allow_pickle)
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        **_ignored,
    ) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (it does not become active)."""
        directory = resolve_adapter_dir(model_id)
        config = load_config(directory)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        self._load_weights(directory, adapter_name, allow_pickle)

    def _load_weights(self, directory: Path, adapter_name: str, allow_pickle: bool) -> None:
        tensors = load_adapter_weights(directory, allow_pickle=allow_pickle)
        bias = self.peft_config[adapter_name].bias
        try:
            load_into_model(self, tensors, adapter_name, bias, source=str(directory))
        except ValueError:
            if adapter_name in self.peft_config and len(self.peft_config) > 1:
                self.delete_adapter(adapter_name)  # leave the model as it was before the failed load
            raise


def _forward_with_signature_of(model: nn.Module):
    """``PeftModel.forward`` advertising the wrapped model's arguments.

    transformers' ``Trainer`` keeps only the dataset columns named in ``inspect.signature(model.forward)``; with
    a bare ``*args, **kwargs`` it would drop them all. A bound method (not a closure) so deepcopy rebinds it.
    """

    def forward(self, *args, **kwargs):
        return PeftModel.forward(self, *args, **kwargs)

    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return forward
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = inspect.Signature([self_parameter, *parameters])
    forward.__doc__ = model.forward.__doc__
    return forward


def resolve_adapter_dir(model_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise download the adapter files from the Hugging Face Hub."""
    path = Path(model_id)
    if path.is_dir():
        return path
    if path.exists() or os.sep in str(model_id) and not _looks_like_repo_id(str(model_id)):
        raise FileNotFoundError(f"Adapter folder {model_id} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(model_id), allow_patterns=["adapter_config.json", "adapter_model.safetensors"]
        )
    except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise FileNotFoundError(
            f"{model_id} is not a local folder and could not be fetched from the Hugging Face Hub ({error})."
        ) from None
    return Path(local)


def _looks_like_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/"))


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Inject adapter ``adapter_name`` described by ``peft_config`` into ``model`` (in place) and wrap it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model needs a torch.nn.Module, got {type(model).__name__}.")
    return PeftModel(model, peft_config, adapter_name)
