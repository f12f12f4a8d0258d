"""``BaseTunerLayer``: what every adapter layer shares, whatever its method (LoRA, AdaLoRA, bottleneck Adapter).

A tuner layer wraps the frozen original module as ``base_layer`` and holds its adapters by name in containers
(``nn.ModuleDict`` / ``nn.ParameterDict``) whose attribute names the layer declares in ``adapter_layer_names``
(PEFT's attribute). Everything that walks adapter weights asks the layer instead of knowing the names itself:

* switching adapters and their ``requires_grad`` (:meth:`set_adapter`), deleting one (:meth:`delete_adapter`);
* saving and loading: :meth:`adapter_state_keys` maps each file key of one adapter (PEFT's: the adapter name
  dropped) to its state-dict key, both relative to the layer;
* unloading: :meth:`unwrap` gives the module that replaces the layer (its base, merged or not).
"""

from __future__ import annotations

import torch
from torch import nn


class BaseTunerLayer(nn.Module):
    """A frozen ``base_layer`` plus adapters by name; subclasses declare their containers and per-adapter state."""

    #: how messages name the method ("LoRA", "AdaLoRA", "bottleneck Adapter")
    method_label = "adapter"
    #: containers of adapter weights, each keyed by adapter name (PEFT's ``adapter_layer_names``)
    adapter_layer_names: tuple[str, ...] = ()
    #: per-adapter values that are not weights (dicts or containers keyed by adapter name; PEFT's name)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False

    # -------------------------------------------------------------------------------------------- adapters
    @property
    def adapter_names(self) -> list[str]:
        first = getattr(self, self.adapter_layer_names[0])
        return list(first)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_containers(self) -> list[tuple[str, nn.Module]]:
        """``(attribute, container)`` for each declared container this layer holds."""
        found = []
        for attribute in self.adapter_layer_names:
            container = getattr(self, attribute, None)
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
                found.append((attribute, container))
        return found

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The weights of adapter ``name`` in this layer."""
        params = []
        for _, container in self.adapter_containers():
            if name in container:
                item = container[name]
                params.extend([item] if isinstance(item, nn.Parameter) else item.parameters())
        return params

    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` active; only active adapters' weights require grad."""
        names = [names] if isinstance(names, str) else list(names)
        for _, container in self.adapter_containers():
            for key in container:
                item = container[key]
                params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
                for param in params:
                    param.requires_grad_(key in names)
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (its weights and every per-adapter value) from this layer."""
        if name in self.merged_adapters:
            raise ValueError(f"Adapter {name!r} is merged into the base weights; unmerge it before deleting.")
        for attribute in (*self.adapter_layer_names, *self.other_param_names):
            table = getattr(self, attribute, None)
            if table is not None and name in table:
                del table[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # ---------------------------------------------------------------------------------------- serialisation
    def adapter_state_keys(self, name: str) -> dict[str, str]:
        """File key -> state-dict key (relative to this layer) of every tensor adapter ``name`` saves.

        PEFT's rule: the state-dict key ``<container>.<adapter>.<rest>`` is saved as ``<container>.<rest>``.
        """
        keys = {}
        for attribute, container in self.adapter_containers():
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, torch.Tensor):
                keys[attribute] = f"{attribute}.{name}"
                continue
            for rest, _ in item.named_parameters():
                keys[f"{attribute}.{rest}"] = f"{attribute}.{name}.{rest}"
        return keys

    # -------------------------------------------------------------------------------------------- unloading
    def unwrap(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        """The module that replaces this layer when adapters are removed: the base (``merge`` is the method's)."""
        if merge:
            raise ValueError(f"{type(self).__name__} adapters cannot be merged into the base weights.")
        return self.base_layer
