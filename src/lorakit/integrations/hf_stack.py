"""Make transformers' ``Trainer``, accelerate and TRL treat lorakit models and configs as PEFT's.

Those libraries decide "is this a PEFT model?" with ``isinstance(model, peft.PeftModel)`` (transformers'
``_is_peft_model``, accelerate's ``is_peft_model``, TRL's trainers) and build adapters with the ``get_peft_model``
and ``PeftConfig`` they imported from peft. A lorakit model failing those checks is treated as a plain
``nn.Module``: checkpoints then hold the full state dict (and fail on tied embeddings), resume ignores the
adapter, and TRL refuses ``peft_config=lorakit.LoraConfig(...)``.

:func:`enable_hf_integration` rebinds exactly those names, in the modules of those three libraries that imported
them, to versions that also accept lorakit's objects (PEFT's own objects keep going to PEFT):

- ``_is_peft_model`` (transformers) and ``is_peft_model`` (accelerate): true for a lorakit ``PeftModel`` too;
- ``PeftModel`` / ``PeftConfig`` used in ``isinstance`` checks (transformers' trainer, TRL): both classes;
- ``get_peft_model`` (TRL): a lorakit config goes to :func:`lorakit.get_peft_model`.

It runs when lorakit is imported (unless ``LORAKIT_NO_HF_INTEGRATION=1``), and again for modules imported later
(an import hook watches for ``transformers``, ``accelerate`` and ``trl`` modules). Calling it by hand is
only needed to be explicit; it is idempotent.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

WATCHED_PACKAGES = ("transformers", "accelerate", "trl")
# Modules whose ``PeftModel`` / ``PeftConfig`` globals are only used in isinstance checks (so a tuple serves).
_CLASS_REBIND_MODULES = ("transformers.trainer",)
_CLASS_REBIND_PACKAGES = ("trl",)

_state = {"enabled": False, "seen": set(), "replacements": {}}


def is_lorakit_model(model) -> bool:
    """True for a lorakit ``PeftModel``, also inside DDP/FSDP/compile wrappers (``.module``, ``._orig_mod``)."""
    from lorakit.peft_model import PeftModel

    for _ in range(4):
        if isinstance(model, PeftModel):
            return True
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return False
        model = inner
    return False


def _is_lorakit_config(config) -> bool:
    from lorakit.config import config_classes

    return isinstance(config, tuple(config_classes()))


def _also_lorakit_model(original):
    @functools.wraps(original)
    def check(model, *args, **kwargs):
        return is_lorakit_model(model) or original(model, *args, **kwargs)

    check.__lorakit_wrapped__ = original
    return check


def _dispatching_get_peft_model(original):
    @functools.wraps(original)
    def get_peft_model(model, peft_config, *args, **kwargs):
        if _is_lorakit_config(peft_config):
            from lorakit.peft_model import get_peft_model as lorakit_get_peft_model

            return lorakit_get_peft_model(model, peft_config, *args, **kwargs)
        return original(model, peft_config, *args, **kwargs)

    get_peft_model.__lorakit_wrapped__ = original
    return get_peft_model


# (defining module, name) of each object to replace, and how. Objects are recognised by where they were
# defined, so nothing is imported here: peft, TRL, ... are only touched once the user's code imports them.
_MODEL_CHECKS = {
    ("transformers.trainer_utils", "_is_peft_model"),
    ("accelerate.utils.modeling", "is_peft_model"),
}
_GET_PEFT_MODEL = ("peft.mapping_func", "get_peft_model")
_PEFT_CLASSES = {("peft.peft_model", "PeftModel"), ("peft.config", "PeftConfig")}


def _replacement_for(value, class_rebind: bool):
    """What to bind instead of ``value`` in a watched module, or None to leave it."""
    if getattr(value, "__lorakit_wrapped__", None) is not None:
        return None  # already ours
    key = (getattr(value, "__module__", None), getattr(value, "__qualname__", None))
    if key in _MODEL_CHECKS:
        return _also_lorakit_model(value)
    if key == _GET_PEFT_MODEL:
        return _dispatching_get_peft_model(value)
    if key in _PEFT_CLASSES and isinstance(value, type) and class_rebind:
        from lorakit.config import config_classes
        from lorakit.peft_model import PeftModel

        ours = (PeftModel,) if key[1] == "PeftModel" else tuple(config_classes())
        return (value, *ours)
    return None


def _rebind(module: ModuleType) -> None:
    cache = _state["replacements"]
    name = module.__name__
    class_rebind = name in _CLASS_REBIND_MODULES or name.split(".", 1)[0] in _CLASS_REBIND_PACKAGES
    if name == "transformers.trainer":
        _warn_without_peft()
    for attribute, value in list(vars(module).items()):
        if callable(value) and id(value) in cache and cache[id(value)][0] is value:
            replacement = cache[id(value)][1]
        else:
            replacement = _replacement_for(value, class_rebind) if callable(value) else None
            if replacement is not None and not isinstance(replacement, tuple):
                cache[id(value)] = (value, replacement)
        if replacement is not None and (class_rebind or not isinstance(replacement, tuple)):
            setattr(module, attribute, replacement)


def _watched(name: str) -> bool:
    return name.split(".", 1)[0] in WATCHED_PACKAGES


def _rebind_loaded_modules() -> None:
    seen = _state["seen"]
    for name, module in list(sys.modules.items()):
        if name in seen or module is None or not _watched(name):
            continue
        seen.add(name)
        _rebind(module)


class _RebindAfterImport(importlib.abc.MetaPathFinder):
    """Import hook: after a watched module executes, rebind its PEFT names (modules imported after enabling)."""

    def find_spec(self, fullname, path, target=None):
        if not _watched(fullname):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_rebind(module):
            exec_module(module)
            _state["seen"].add(module.__name__)
            _rebind(module)

        spec.loader.exec_module = exec_and_rebind
        return spec


def _warn_without_peft() -> None:
    """transformers only has its PEFT code paths (adapter-only checkpoints, adapter resume) with peft installed."""
    try:
        missing = importlib.util.find_spec("peft") is None
    except (ValueError, AttributeError):  # sys.modules["peft"] is None: imports of peft are blocked
        missing = True
    if missing:
        warnings.warn(
            "transformers' Trainer saves and resumes lorakit adapters through its PEFT code paths, which exist "
            "only when the peft package is installed: `pip install peft` (lorakit still does all the LoRA work). "
            "Without it, Trainer checkpoints hold the full state dict and fail on tied embeddings.",
            stacklevel=2,
        )


def enable_hf_integration() -> None:
    """Let transformers' Trainer, accelerate and TRL recognise lorakit models and configs (idempotent)."""
    if not _state["enabled"]:
        sys.meta_path.insert(0, _RebindAfterImport())
        _state["enabled"] = True
    _rebind_loaded_modules()
