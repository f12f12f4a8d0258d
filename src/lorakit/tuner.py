"""``LoraModel``: the user's model with LoRA layers injected, and the operations over all its adapters.

It holds the user's model as ``.model`` (so parameter names read ``base_model.model.<path>`` under a
:class:`~lorakit.peft_model.PeftModel`, exactly as in PEFT) and one config per adapter name.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lorakit.config import TASK_HEAD_MODULES, LoraConfig
from lorakit.inject import (
    inject_adapter,
    inject_modules_to_save,
    lora_layers,
    replace_with_base,
    save_wrappers,
    tuner_layers,
)
from lorakit.lora_layer import LoraLayer
from lorakit.lora_ops import shared_dropout_scope

BASE_ADAPTER = "__base__"


def _is_checkpointing(model: nn.Module) -> bool:
    for attribute in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers v5, v4
        if hasattr(type(model), attribute):
            return bool(getattr(model, attribute))
    return False


def with_task_heads(config: LoraConfig) -> LoraConfig:
    """A copy of ``config`` whose modules_to_save also holds the heads its task trains from scratch."""
    heads = TASK_HEAD_MODULES.get(config.task_type, [])
    if not heads:
        return config
    config = copy.copy(config)
    config.modules_to_save = list(dict.fromkeys([*(config.modules_to_save or []), *heads]))
    return config


@contextlib.contextmanager
def restored_on_failure(model: nn.Module, cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Put ``model`` back as it was when the block raises: its sub-modules, parameters, ``requires_grad`` flags
    and train/eval modes; ``cleanup`` runs first (to drop per-adapter entries of layers that stay).

    Injecting an adapter swaps modules in their parents (``setattr``) and adds entries to per-adapter
    containers; restoring every module's own tables of children and parameters undoes both, however far the
    injection or loading got, so a failed ``get_peft_model`` or ``from_pretrained`` can be retried.
    """
    modules = list(model.modules())
    tables = [(m, dict(m._modules), dict(m._parameters)) for m in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in modules]
    try:
        yield
    except BaseException:
        if cleanup is not None:
            cleanup()
        for module, children, parameters in tables:
            module._modules.clear()
            module._modules.update(children)
            module._parameters.clear()
            module._parameters.update(parameters)
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, training in modes:
            module.training = training
        raise


class BaseTuner(nn.Module):
    """What every adapter method shares: the wrapped ``model``, its configs by adapter name, which adapters are
    active, and adding / switching / deleting / disabling them. A method supplies ``add_adapter`` and
    ``adapter_layers`` (its wrapper modules, each with ``set_adapter``, ``delete_adapter``, ``disable_adapters``).
    """

    prefix = ""  # parameter-name prefix of the method's adapter weights
    _unloaded = False  # set by merge_and_unload() / unload(): the adapter layers are gone

    def __init__(self, model: nn.Module, config, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict = {}
        self.active_adapter: str | list[str] = adapter_name
        self.add_adapter(adapter_name, config)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        # Dropout masks are drawn only in training with autograd: only then is the sharing scope needed (and
        # the checkpointing test, which walks every module, is worth its cost).
        training = self.training and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        sharing = training and not _is_checkpointing(self.model)
        scope = shared_dropout_scope() if sharing else contextlib.nullcontext()
        batch = contextlib.nullcontext() if adapter_names is None else self.mixed_batch(adapter_names)
        with scope, batch:
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def add_adapter(self, adapter_name: str, config) -> None:
        raise NotImplementedError

    def adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """Every adapter layer of the model (inner layers first, see :func:`lorakit.inject.tuner_layers`)."""
        return tuner_layers(self.model)

    def mixed_batch(self, adapter_names: list[str]):
        raise ValueError(f"Mixed-adapter batches (adapter_names) are not supported by {type(self).__name__}.")

    # --------------------------------------------------------------------------------------------- adapters
    @property
    def active_adapters(self) -> list[str]:
        active = self.active_adapter
        return [active] if isinstance(active, str) else list(active)

    def _check_new_adapter(self, adapter_name: str, config) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name.")
        if self.peft_config and type(config) is not type(next(iter(self.peft_config.values()))):
            raise ValueError("All adapters on one model must be of the same method (e.g. all LoRA).")

    def _refresh_trainable(self) -> None:
        """Freeze everything, then let the active adapters (and the biases their config asks for) train."""
        configs = [self.peft_config[a] for a in self.active_adapters if a in self.peft_config]
        bias = getattr(configs[0], "bias", "none") if configs else "none"
        for param in self.model.parameters():
            param.requires_grad_(False)
        for _, layer in self.adapter_layers():
            layer.set_adapter(self.active_adapters)
            base_bias = getattr(getattr(layer, "base_layer", None), "bias", None)
            if bias == "lora_only" and isinstance(base_bias, nn.Parameter):
                base_bias.requires_grad_(True)
        if bias == "all":
            for name, param in self.model.named_parameters():
                if (
                    name.endswith("bias")
                    and f".{self.prefix}" not in name
                    and ".original_module." not in name
                ):
                    param.requires_grad_(True)
        for _, wrapper in save_wrappers(self.model):
            wrapper.set_adapter(self.active_adapters)
        if any(c.inference_mode for c in configs):
            for param in self.model.parameters():
                param.requires_grad_(False)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several whose outputs add up; only active adapters train.

        ``inference_mode=True`` freezes the activated adapters (PEFT's flag). An adapter whose config has
        ``inference_mode`` (loaded with ``is_trainable=False``) stays frozen either way.
        """
        self._check_not_unloaded("set_adapter")
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; existing: {list(self.peft_config)}.")
        self.active_adapter = adapter_name
        self._refresh_trainable()
        if inference_mode:
            self.set_requires_grad(names, requires_grad=False)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Switch gradients of the named adapters' weights (and their ``modules_to_save`` copies) on or off."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for param in self._adapter_parameters(names):
            param.requires_grad_(requires_grad)

    def _adapter_parameters(self, names: set[str] | None = None) -> list[nn.Parameter]:
        """Weights of the adapters ``names`` (all adapters if None), as each layer reports them."""
        params = []
        for _, layer in self.adapter_layers():
            for name in layer.adapter_names if names is None else names:
                params.extend(layer.adapter_parameters(name))
        for _, wrapper in save_wrappers(self.model):
            for name, module in wrapper.modules_to_save.items():
                if names is None or name in names:
                    params.extend(module.parameters())
        return list({id(p): p for p in params}.values())

    def _check_not_unloaded(self, action: str) -> None:
        if self._unloaded:
            raise ValueError(
                f"Cannot {action}: the adapters were removed from this model by merge_and_unload() or unload(), "
                f"which return the plain model (merged or not). Use that returned model (save it with its own "
                f"save_pretrained), or wrap a model again with get_peft_model / PeftModel.from_pretrained."
            )

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Unknown adapter {adapter_name!r}; existing: {list(self.peft_config)}.")
        for _, layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in save_wrappers(self.model):
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
        if self.peft_config:
            self.set_adapter(self.active_adapter)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the ``with`` block, as PEFT does.

        Adapters merged into the base weights are unmerged by the first forward inside the block (and stay
        unmerged after it); ``modules_to_save`` modules fall back to the original module; adapter weights do not
        require grad inside the block. On exit (also after an exception) the previous state comes back: a nested
        block leaves the adapters disabled for the outer one, and the ``requires_grad`` flags are restored as they
        were (PEFT turns on the active adapters' gradients instead, even for adapters loaded for inference).
        """
        wrappers = [m for _, m in self.adapter_layers()] + [m for _, m in save_wrappers(self.model)]
        states = {bool(m.disable_adapters) for m in wrappers}
        if len(states) > 1:
            warnings.warn(
                "The model contains some adapter layers that are enabled and others that are disabled. This is most "
                "likely unintentional. After exiting the disable_adapter context, all adapters will be enabled",
                stacklevel=3,
            )
        for name in self.active_adapters:
            bias = getattr(self.peft_config.get(name), "bias", "none")
            if bias != "none":
                warnings.warn(
                    f"Careful, disabling adapter layers with bias configured to be '{bias}' does not produce the "
                    "same output as the base model would without adaption.",
                    stacklevel=3,
                )
        grads = [(p, p.requires_grad) for p in self._adapter_parameters()]
        for module in wrappers:
            module.disable_adapters = True
        for param, _ in grads:
            param.requires_grad_(False)
        try:
            yield
        finally:
            if states != {True}:  # enabled (or mixed) before: enable all, as PEFT does
                for module in wrappers:
                    module.disable_adapters = False
            for param, flag in grads:
                param.requires_grad_(flag)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's ``autocast_adapter_dtype``: with False, adapter weights take their base weight's dtype.

        With True (the default) the layers already hold float32 adapters over float16 / bfloat16 bases (and the
        base dtype over float32 / float64 ones), which is what PEFT's upcast gives; nothing is left to do.
        """
        if autocast_adapter_dtype:
            return
        for _, layer in self.adapter_layers():
            weight = getattr(getattr(layer, "base_layer", None), "weight", None)
            if weight is None and hasattr(layer, "base_weight"):
                weight = layer.base_weight()  # e.g. MultiheadAttention: its in_proj weight
            dtype = getattr(weight, "dtype", None)
            if dtype is None or not dtype.is_floating_point:
                continue
            for key, param in layer.named_parameters():
                parts = key.split(".")
                if parts[0] != "base_layer" and len(parts) > 1 and parts[1] == adapter_name:
                    param.data = param.data.to(dtype)


class LoraModel(BaseTuner):
    """A model with LoRA adapters; ``forward`` is the wrapped model's ``forward``."""

    prefix = "lora_"

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter; the active adapter does not change (as in PEFT)."""
        config = with_task_heads(config)
        self._check_new_adapter(adapter_name, config)
        with restored_on_failure(self.model, lambda: self._forget(adapter_name)):
            inject_adapter(self.model, config, adapter_name)
            inject_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self._refresh_trainable()

    def adapter_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        return lora_layers(self.model)

    def _forget(self, adapter_name: str) -> None:
        """Drop a half-injected adapter from the layers that held other adapters before."""
        for _, layer in lora_layers(self.model):
            if adapter_name in layer.r:
                layer.delete_adapter(adapter_name)
        for _, wrapper in save_wrappers(self.model):
            wrapper.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def mixed_batch(self, adapter_names: list[str]) -> Iterator[None]:
        """Inside the block, batch row ``i`` uses adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"Unknown adapter(s) {unknown} in adapter_names; existing: {list(self.peft_config)} "
                f"(or {BASE_ADAPTER!r} for the base model)."
            )
        layers = [layer for _, layer in lora_layers(self.model)]
        rows = tuple(adapter_names)
        for layer in layers:
            layer.row_adapters = rows
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

    # ---------------------------------------------------------------------------------------------- merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or named) adapters into the base weights, keeping the LoRA layers.

        As in PEFT, adapters already merged are skipped with a warning ("All adapters are already merged, nothing
        to do." or "Already following adapters were merged ..."), never added twice.
        """
        self._check_not_unloaded("merge_adapter")
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names should be a list of strings, got {adapter_names!r}.")
        notes = set()
        for _, layer in lora_layers(self.model):
            names = layer.active_adapters if adapter_names is None else adapter_names
            todo = [n for n in names if n not in layer.merged_adapters]
            if layer.merged:  # PEFT's wording, about the requested names (held by this layer or not)
                notes.add(
                    f"Already following adapters were merged {','.join(layer.merged_adapters)}. "
                    f"You are now additionally merging {','.join(todo)}."
                    if todo
                    else "All adapters are already merged, nothing to do."
                )
            todo = [n for n in todo if n in layer.r]
            if todo:
                layer.merge(safe_merge=safe_merge, adapter_names=todo)
        for note in sorted(notes):
            warnings.warn(note, stacklevel=3)

    def unmerge_adapter(self) -> None:
        for _, layer in lora_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the active (or named) adapters and return the plain model, with no LoRA module left."""
        self._check_not_unloaded("merge_and_unload")
        if adapter_names is not None:
            for _, layer in lora_layers(self.model):
                layer.active_adapters = [n for n in adapter_names if n in layer.r]
        model = replace_with_base(self.model, merge=True, safe_merge=safe_merge)
        self._unloaded = True
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model."""
        self._check_not_unloaded("unload")
        model = replace_with_base(self.model, merge=False)
        self._unloaded = True
        return model

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """A new adapter ``adapter_name`` combining ``adapters`` with ``weights`` (see :mod:`lorakit.weighted`)."""
        from lorakit.weighted import add_weighted_adapter

        self._check_not_unloaded("add_weighted_adapter")
        add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_clamp=svd_clamp,
            svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver,
            density=density,
            majority_sign_method=majority_sign_method,
        )
