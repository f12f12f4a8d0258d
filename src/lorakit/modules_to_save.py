"""``modules_to_save``: modules trained in full (a copy per adapter) and saved with the adapter, as in PEFT.

Used for task heads trained from scratch (``classifier``, ``score``) and anything a config names in
``modules_to_save``; the original module stays frozen as ``original_module``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

from torch import nn

from lorakit.config import TASK_HEAD_MODULES
from lorakit.module_names import examples, get_submodule_parent, is_internal_name, name_matches
from lorakit.tuner_layer import BaseTunerLayer


class ModulesToSaveWrapper(nn.Module):
    """Keeps the original module frozen and trains a full copy per adapter (e.g. a classification head)."""

    def __init__(self, original_module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.add_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            return
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)
        self.original_module.requires_grad_(False)
        if self.active_adapter is None:
            self.active_adapter = name

    def set_adapter(self, names: str | list[str]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        chosen = [n for n in names if n in self.modules_to_save]
        if len(chosen) > 1:
            raise ValueError(f"Only one adapter can drive a modules_to_save module at a time, got {chosen}.")
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name in chosen)
        self.active_adapter = chosen[0] if chosen else None

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.modules_to_save), None)

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Model code reads attributes of the wrapped head (e.g. ``score.weight``, ``lm_head.out_features``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original_module"), name)


def _check_every_module_to_save_exists(model: nn.Module, module_names: list[str]) -> None:
    optional = {head for heads in TASK_HEAD_MODULES.values() for head in heads}
    all_names = [n for n, _ in model.named_modules() if n and not is_internal_name(n)]
    for entry in module_names:
        if entry not in optional and not any(name_matches(n, [entry]) for n in all_names):
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module of the model. "
                f"Some module names that exist: {examples(model, 12)}."
            )


def inject_modules_to_save(model: nn.Module, module_names: list[str] | None, adapter_name: str) -> list[str]:
    """Wrap each module named (suffix match) in ``module_names`` so it trains in full for this adapter.

    An entry that matches no module is an error, as for ``target_modules``, except the task heads lorakit and
    PEFT add by themselves (``classifier`` and ``score`` for sequence classification: a model has one of them).
    """
    if not module_names:
        return []
    _check_every_module_to_save_exists(model, module_names)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not name or is_internal_name(name) or not name_matches(name, module_names):
            continue
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
        elif isinstance(module, BaseTunerLayer):
            raise ValueError(
                f"Module {name!r} cannot be both a {module.method_label} target and in modules_to_save."
            )
        else:
            parent, child = get_submodule_parent(model, name)
            setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
        wrapped.append(name)
    return wrapped


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module
