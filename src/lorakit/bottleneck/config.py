"""``AdapterConfig`` (alias ``BottleneckConfig``): the bottleneck Adapter of Houlsby et al. 2019, saved in lorakit's
own format.

PEFT has no bottleneck Adapter, so the folder layout is PEFT's (``adapter_config.json`` +
``adapter_model.safetensors``) but the ``peft_type`` is lorakit's own ``"BOTTLENECK_ADAPTER"``; PEFT refuses such a
folder, and lorakit reads it with :meth:`lorakit.PeftConfig.from_pretrained` (the method table maps the type to
this class).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.config import ConfigFile, PeftType, TaskType

NON_LINEARITIES = ("relu", "gelu", "gelu_tanh", "silu", "tanh", "identity")
INITS = ("zero_up", "houlsby", "random")


@dataclass
class AdapterConfig(ConfigFile):
    """Configuration of a bottleneck Adapter (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751, sec. 2.1).

    After each target module ``f`` the adapter maps the output ``h = f(x)`` (size d) to

        h' = h + W_up act(W_down dropout(h) + b_down) + b_up,     W_down: m x d,  W_up: d x m

    with bottleneck size ``m`` much smaller than ``d``. Unlike LoRA it cannot be merged into ``f``'s weights
    (``act`` is nonlinear), so it costs extra inference time.

    Args:
        task_type: a :class:`~lorakit.config.TaskType`; decides which heads are trained and saved in full.
        target_modules: modules after which an adapter is inserted (PEFT's matching rules: a list of names or
            suffixes, a regex string, or ``"all-linear"``). ``None`` = Houlsby's placement for known
            architectures: after the attention output projection and the feed-forward output projection.
        exclude_modules, layers_to_transform, layers_pattern: as in :class:`~lorakit.config.LoraConfig`.
        bottleneck_size: ``m``, the width of the bottleneck (> 0).
        non_linearity: one of ``relu``, ``gelu``, ``gelu_tanh``, ``silu``, ``tanh``, ``identity``.
        init: ``"zero_up"`` (default: ``W_down`` kaiming-uniform, ``W_up`` and biases zero, so training starts
            exactly at the base model), ``"houlsby"`` (both projections normal with std 1e-2 truncated at 2 std,
            biases zero: near-identity, paper sec. 2.1) or ``"random"`` (PyTorch's Linear init for both; tests).
        adapter_dropout: dropout on the adapter input, in [0, 1).
        bias: ``"none"`` or ``"all"`` (every bias of the base model trains too).
        modules_to_save: modules trained in full and saved with the adapter.
        inference_mode: freeze everything (set when loading for inference).
        base_model_name_or_path: the model the adapter was trained on (filled in when saving).
    """

    task_type: TaskType | str | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bottleneck_size: int = 64
    non_linearity: str = "relu"
    init: str = "zero_up"
    adapter_dropout: float = 0.0
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    peft_type: PeftType = field(default=PeftType.ADAPTER, init=False)

    def __post_init__(self) -> None:
        self.task_type = TaskType.parse(self.task_type)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.init is True:
            self.init = "zero_up"
        elif self.init is False:
            self.init = "random"
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and what is accepted."""
        size = self.bottleneck_size
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(
                f"bottleneck_size must be a positive integer (the adapter width m), got {size!r}."
            )
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"non_linearity must be one of {', '.join(NON_LINEARITIES)}; got {self.non_linearity!r}."
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)} (or True/False); got {self.init!r}.")
        if not 0.0 <= float(self.adapter_dropout) < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}.")
        if self.bias not in ("none", "all"):
            raise ValueError(f"bias must be 'none' or 'all' for the bottleneck Adapter, got {self.bias!r}.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform.")


# The class keeps its public name (users and saved configs know it as ``AdapterConfig``); this alias names the
# method it configures, like ``BottleneckLayer`` and ``BottleneckModel``.
BottleneckConfig = AdapterConfig
