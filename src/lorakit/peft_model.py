"""``PeftModel`` and ``get_peft_model``: the public face of an adapted model, with PEFT's API.

``PeftModel(model)`` behaves like ``model`` (forward, generate, config, ``.to(device)``) and adds the adapter
operations. Its parameters are named ``base_model.model.<path>`` as in PEFT, and its folders are PEFT's:
``adapter_config.json`` + ``adapter_model.safetensors``, the ``default`` adapter at the top of the folder and any
other adapter in a sub-folder named after it, with a ``README.md`` model card. Saving and loading live in
:mod:`lorakit.saving`, the state-dict functions in :mod:`lorakit.state_dict`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import types
import warnings
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from lorakit.config import LoraConfig, PeftConfig, load_adapter_config
from lorakit.init_conversion import save_converted
from lorakit.layer_kinds import is_quantized_linear
from lorakit.methods import method_for_type
from lorakit.model_card import base_model_name
from lorakit.saving import (
    PICKLE_REFUSED,
    load_peft_weights,
    resolve_adapter_dir,
    save_adapters,
)
from lorakit.serialization import load_into_model
from lorakit.tuner import restored_on_failure

__all__ = ["PeftModel", "get_peft_model", "resolve_adapter_dir"]


class PeftModel(nn.Module):
    """A model with adapters. Attribute access falls through to the wrapped model (``model.config`` etc.).

    ``autocast_adapter_dtype=False`` gives adapter weights their base weight's dtype (default: float32 over a
    float16 / bfloat16 base). ``low_cpu_mem_usage`` is accepted for PEFT's signature; lorakit's adapters are small
    and always created with real weights, so it changes nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ):
        super().__init__()
        if isinstance(model, PeftModel):
            raise ValueError("This model already has adapters; use add_adapter() to add another one.")
        if not isinstance(peft_config, PeftConfig):
            raise TypeError(
                f"peft_config must be a lorakit config (LoraConfig, ...), got {type(peft_config).__name__}."
            )
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = base_model_name(model)
        tuner_cls = method_for_type(peft_config.peft_type).tuner_class
        self.base_model = tuner_cls(model, peft_config, adapter_name)
        self.base_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
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

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

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
        # the packed storage of 4-bit layers made shardable for FSDP is held as (frozen) parameters
        storage = {
            id(t) for m in self.modules() if hasattr(m, "quant_state") for t in m.quant_state().values()
        }
        for param in self.parameters():
            if id(param) in storage:
                continue
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        for module in self.modules():
            if is_quantized_linear(module):
                total += module.in_features * module.out_features
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------------------------------------- adapters
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Inject a new, untrained adapter; it does not become active (``set_adapter`` does that)."""
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = base_model_name(self.get_base_model())
        self.base_model.add_adapter(adapter_name, peft_config)
        self.base_model._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (a list: several, whose updates add up).

        Its weights train unless ``inference_mode`` is true or it was loaded with ``is_trainable=False``.
        """
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients on (or off) for the named adapters' weights, active or not."""
        self.base_model.set_requires_grad(adapter_names, requires_grad=requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (see :meth:`lorakit.tuner.BaseTuner.disable_adapter`)."""
        with self.base_model.disable_adapter():
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        self.base_model.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the adapters into the weights and return the plain model; this PeftModel is then spent."""
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # ---------------------------------------------------------------------------------------- save / load
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: bool | str = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs,
    ) -> None:
        """Write each adapter's config and weights; ``default`` at the top, others in ``<dir>/<name>/``.

        ``state_dict`` (a keyword, as transformers' Trainer passes it): take the adapter tensors from this full
        state dict of the model (possibly gathered from a DDP / FSDP / DeepSpeed wrapper, whose key infixes are
        understood) instead of from the live modules. ``save_embedding_layers=True`` also saves the input and
        output embeddings in full. ``path_initial_model_for_weight_conversion``: the folder of a PiSSA / OLoRA
        adapter saved before training; the adapters are then saved as plain LoRA adapters of twice the rank over
        the original base weights (:mod:`lorakit.init_conversion`). Other keyword arguments (PEFT's Hub options)
        are ignored.
        """
        if not safe_serialization:
            raise ValueError(PICKLE_REFUSED)
        if path_initial_model_for_weight_conversion is not None:
            save_converted(
                self,
                save_directory,
                path_initial_model_for_weight_conversion,
                selected_adapters,
                save_embedding_layers,
                is_main_process,
                state_dict=kwargs.get("state_dict"),
            )
            return
        save_adapters(
            self,
            save_directory,
            selected_adapters,
            save_embedding_layers,
            is_main_process,
            state_dict=kwargs.get("state_dict"),
        )

    def create_or_update_model_card(self, output_dir: str | os.PathLike) -> None:
        from lorakit.model_card import create_or_update_model_card

        create_or_update_model_card(self, output_dir)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter saved in ``model_id`` (a folder, or a Hub repo id).

        Unless ``is_trainable``, the adapter is frozen and the model is put in eval mode (dropout off), as in
        PEFT. Loading is strict: a missing, unexpected or mis-shaped tensor raises, naming the key, and leaves
        ``model`` exactly as it was (no adapter layer left in it), so it can be loaded again.
        """
        directory = resolve_adapter_dir(model_id, **kwargs)
        if config is not None and not isinstance(config, PeftConfig):
            raise ValueError(f"The input config must be a PeftConfig, got {type(config).__name__}.")
        config = config if config is not None else load_adapter_config(directory)
        config.inference_mode = not is_trainable
        if key_mapping is None:
            key_mapping = getattr(model, "_checkpoint_conversion_mapping", None)
        with restored_on_failure(model):
            peft_model = cls(model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
            peft_model.load_adapter(
                directory,
                adapter_name,
                is_trainable=is_trainable,
                autocast_adapter_dtype=autocast_adapter_dtype,
                key_mapping=key_mapping,
                allow_pickle=allow_pickle,
            )
        return peft_model

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> _IncompatibleKeys:
        """Load the adapter saved in ``model_id`` as ``adapter_name`` and return the load result.

        A new name adds the adapter (not active; trainable only with ``is_trainable``); an existing name gets its
        weights replaced (how transformers' Trainer resumes from a checkpoint). Without ``is_trainable`` the model
        is put in eval mode. The result has PEFT's ``missing_keys`` / ``unexpected_keys``, always empty: where
        PEFT would list keys, lorakit raises ``ValueError`` naming them.
        """
        directory = resolve_adapter_dir(model_id, **kwargs)
        is_new = adapter_name not in self.peft_config
        if is_new:
            config = load_adapter_config(directory)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config, autocast_adapter_dtype=autocast_adapter_dtype)
            if is_trainable:
                self.set_requires_grad(adapter_name)
        tensors = load_peft_weights(directory, key_mapping=key_mapping, allow_pickle=allow_pickle)
        bias = getattr(self.peft_config[adapter_name], "bias", "none")
        try:
            load_into_model(self, tensors, adapter_name, bias, source=str(directory))
        except ValueError:
            if is_new and len(self.peft_config) > 1:
                self.delete_adapter(adapter_name)  # leave the model as it was before the failed load
            raise
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys([], [])


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


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Inject adapter ``adapter_name`` described by ``peft_config`` into ``model`` (in place) and wrap it.

    Args (as PEFT's):
        mixed: return a :class:`~lorakit.mapping.PeftMixedModel` (LoRA adapters only in lorakit).
        autocast_adapter_dtype: True keeps float32 adapters over float16 / bfloat16 weights; False gives them
            the base weight's dtype.
        revision: the base model's revision, recorded in the config (and so in ``adapter_config.json``).
        low_cpu_mem_usage: accepted; lorakit always creates the (small) adapter weights directly.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"get_peft_model needs a torch.nn.Module, got {type(model).__name__}.")
    if revision is not None:
        if getattr(peft_config, "revision", None) not in (None, revision):
            warnings.warn(
                f"peft config has already set base model revision to {peft_config.revision}, overwriting with "
                f"revision {revision}",
                stacklevel=2,
            )
        peft_config.revision = revision
    if mixed:
        from lorakit.mapping import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name)
    return PeftModel(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )
