"""The bottleneck Adapter layer: ``h + up(act(down(h)))`` after a frozen module (Houlsby et al. 2019, sec. 2.1).

The wrapped module is kept as ``base_layer``; each adapter has ``adapter_down.<name>`` (d -> m, with bias) and
``adapter_up.<name>`` (m -> d, with bias). Several active adapters each read the base output and their
updates add up (as LoRA adapters do).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.layer_kinds import adapter_dtype_device, output_size
from lorakit.tuner_layer import BaseTunerLayer

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}
HOULSBY_STD = 1e-2


def unsupported_message(name: str, module: nn.Module, model: nn.Module | None = None) -> str:
    return (
        f"A bottleneck Adapter cannot follow {name!r}, a {type(module).__name__}: it needs a "
        f"layer whose output size is known (nn.Linear, transformers Conv1D, nn.Embedding, 4-bit Linear). "
        f"Target the block's output projection instead (e.g. o_proj and down_proj in Llama)."
    )


class BottleneckLayer(BaseTunerLayer):
    """A frozen module followed by residual bottleneck adapters."""

    method_label = "bottleneck Adapter"
    adapter_layer_names = ("adapter_down", "adapter_up")
    other_param_names = ("adapter_act", "adapter_dropout")

    def __init__(self, base_layer: nn.Module, module_name: str = "module"):
        size = output_size(base_layer)
        if size is None:
            raise TypeError(unsupported_message(module_name, base_layer))
        super().__init__(base_layer)
        self.out_features = size
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()

    def update_layer(
        self, name: str, bottleneck_size: int, non_linearity: str, dropout: float, init: str
    ) -> None:
        """Add adapter ``name`` with a bottleneck of width ``bottleneck_size``."""
        if name in self.adapter_down:
            raise ValueError(
                f"Adapter {name!r} already exists on this layer; delete it first or pick a new name."
            )
        dtype, device = adapter_dtype_device(self.base_layer)
        self.adapter_down[name] = nn.Linear(self.out_features, bottleneck_size, dtype=dtype, device=device)
        self.adapter_up[name] = nn.Linear(bottleneck_size, self.out_features, dtype=dtype, device=device)
        self.adapter_act[name] = ACTIVATIONS[non_linearity]()
        self.adapter_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._init_weights(name, init)
        if not self.active_adapters:
            self.active_adapters = [name]

    def _init_weights(self, name: str, init: str) -> None:
        down, up = self.adapter_down[name], self.adapter_up[name]
        with torch.no_grad():
            if init == "zero_up":
                nn.init.zeros_(down.bias)
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
            elif init == "houlsby":
                for linear in (down, up):
                    nn.init.trunc_normal_(
                        linear.weight, std=HOULSBY_STD, a=-2 * HOULSBY_STD, b=2 * HOULSBY_STD
                    )
                    nn.init.zeros_(linear.bias)
            # "random": PyTorch's own Linear init for both projections

    def adapter_update(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """``W_up act(W_down dropout(h) + b_down) + b_up`` for adapter ``name``."""
        down = self.adapter_down[name]
        x = self.adapter_dropout[name](hidden.to(down.weight.dtype))
        return self.adapter_up[name](self.adapter_act[name](down(x)))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden = self.base_layer(x, *args, **kwargs)
        names = [n for n in self.active_adapters if n in self.adapter_down]
        if self.disable_adapters or not names:
            return hidden
        result = hidden
        for name in names:
            result = result + self.adapter_update(name, hidden).to(hidden.dtype)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}"
