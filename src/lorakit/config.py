"""Adapter configuration: ``LoraConfig`` and ``TaskType``, field for field as in Hugging Face PEFT.

The configuration is written next to the weights as ``adapter_config.json``; the JSON uses PEFT's key names and
``peft_type`` so that PEFT reads lorakit's files and lorakit reads PEFT's.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """What the wrapped model does; decides which task heads are trained and saved by default."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    @classmethod
    def parse(cls, value: str | TaskType | None) -> TaskType | None:
        if value is None or isinstance(value, TaskType):
            return value
        try:
            return cls(str(value).upper())
        except ValueError:
            valid = ", ".join(t.value for t in cls)
            raise ValueError(f"Unknown task_type {value!r}; use one of: {valid}.") from None


# Heads that a task trains from scratch: they are trained in full and saved with the adapter, as PEFT does.
TASK_HEAD_MODULES: dict[TaskType, list[str]] = {
    TaskType.SEQ_CLS: ["classifier", "score"],
    TaskType.TOKEN_CLS: ["classifier", "score"],
    TaskType.QUESTION_ANS: ["qa_outputs"],
}


class PeftType(str, enum.Enum):
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAPTER = "BOTTLENECK_ADAPTER"


# Keys PEFT writes that lorakit understands only at their default value; anything else is refused at load time.
_PEFT_KEYS_AT_DEFAULT: dict[str, Any] = {
    "revision": None,
    "auto_mapping": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "layer_replication": None,
    "runtime_config": {"ephemeral_gpu_offload": False},
    "lora_bias": False,
    "eva_config": None,
    "corda_config": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "qalora_group_size": 16,
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "ensure_weight_tying": False,
    "layer_replication_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "velora_config": None,
}
# Keys PEFT writes that describe provenance or runtime options, not the adapter's math: read and dropped.
_PEFT_KEYS_IGNORED = {"peft_version", "auto_mapping", "revision", "megatron_core", "runtime_config"}


class PeftConfig:
    """Base of every adapter config (PEFT's ``PeftConfig``): ``adapter_config.json`` with PEFT's keys and layout.

    Subclasses are dataclasses with a ``peft_type`` field. ``PeftConfig.from_pretrained(folder)`` reads any
    adapter folder and returns the config class its ``peft_type`` names (``LoraConfig``, ``AdaLoraConfig``, ...);
    ``LoraConfig.from_pretrained(folder)`` insists on that class.
    """

    # PEFT's flags for prompt-learning methods, read by transformers' Trainer and TRL; lorakit has none.
    is_prompt_learning = False
    is_adaption_prompt = False

    # ----------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["peft_type"] = self.peft_type.value
        data["task_type"] = self.task_type.value if self.task_type is not None else None
        return data

    def save_pretrained(
        self, directory: str | os.PathLike, auto_mapping_dict: dict | None = None, **_ignored
    ) -> None:
        """Write ``adapter_config.json`` atomically (temporary file, then rename).

        ``auto_mapping_dict`` (PEFT's: the base model's class and library, for a config without task type) is
        written under ``auto_mapping``; other keyword arguments (PEFT's Hub options) are ignored.
        """
        path = Path(directory) / CONFIG_NAME
        if path.parent.is_file():
            raise ValueError(f"{path.parent} is a file; save_pretrained needs a folder path.")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        if auto_mapping_dict is not None:
            data["auto_mapping"] = auto_mapping_dict
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build a config from PEFT-style JSON: unknown keys warn and are ignored, unsupported features refuse."""
        data = dict(data)
        peft_type = data.pop("peft_type", cls.peft_type_name())
        if peft_type != cls.peft_type_name():
            raise ValueError(
                f"This adapter is of type {peft_type!r}, not {cls.peft_type_name()!r}; "
                f"load it with the matching config class."
            )
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_KEYS_IGNORED:
                continue
            elif key in _PEFT_KEYS_AT_DEFAULT:
                if value not in (_PEFT_KEYS_AT_DEFAULT[key], None, False, {}, []):
                    raise ValueError(
                        f"adapter_config.json sets {key}={value!r}, a PEFT feature lorakit does not support; "
                        f"only the default ({_PEFT_KEYS_AT_DEFAULT[key]!r}) can be loaded."
                    )
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"Ignoring unknown adapter_config.json keys {sorted(unknown)} (written by a newer library?).",
                stacklevel=2,
            )
        return cls(**kwargs)

    @classmethod
    def peft_type_name(cls) -> str:
        return cls.__dataclass_fields__["peft_type"].default.value

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None, **hub_kwargs):
        """Read ``adapter_config.json`` from a folder (or ``folder/subfolder``, or a Hugging Face Hub repo).

        On ``PeftConfig`` itself the class is chosen from the file's ``peft_type``; on a subclass the file must be
        of that subclass's type. ``hub_kwargs`` (``revision``, ``token``, ``cache_dir``) go to the Hub download.
        """
        path = config_file_path(directory, subfolder, **hub_kwargs)
        if cls is PeftConfig:
            return load_adapter_config(path.parent)
        return cls.from_dict(read_config_json(path))

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **_ignored) -> dict[str, Any]:
        """The JSON object of a config file as a dict, as PEFT returns it (a ``runtime_config`` key is dropped)."""
        data = read_config_json(path_json_file)
        if "runtime_config" in data:
            warnings.warn(
                "The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations "
                "are only valid at runtime.",
                stacklevel=2,
            )
            del data["runtime_config"]
        return data

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build the config class named by ``kwargs["peft_type"]`` (or ``cls`` without one) from its fields."""
        peft_type = kwargs.get("peft_type")
        if peft_type is None:
            return cls.from_dict(kwargs)
        return config_class_for(str(getattr(peft_type, "value", peft_type))).from_dict(kwargs)


ConfigFile = PeftConfig  # the name this base class had before it took PEFT's


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in an ``adapter_config.json``; every error names the file.

    ``FileNotFoundError`` when it is missing; ``ValueError`` when it is not UTF-8 text, not JSON, or not a
    JSON object (a corrupt or truncated file). The one reader of the file for the library and the CLI.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {path.parent}: is this an adapter folder written by save_pretrained?"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: the file is corrupt. Save the adapter again.") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}): the file is "
            "corrupt. Save the adapter again."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}: the file is corrupt.")
    return data


def config_file_path(directory: str | os.PathLike, subfolder: str | None = None, **hub_kwargs) -> Path:
    """``<directory>[/<subfolder>]/adapter_config.json``: a local file, or downloaded from the Hub."""
    local = Path(directory) / subfolder if subfolder else Path(directory)
    if local.is_dir() or local.exists() or not looks_like_repo_id(str(directory)):
        return local / CONFIG_NAME
    try:
        from huggingface_hub import hf_hub_download

        allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir")}
        return Path(hf_hub_download(str(directory), CONFIG_NAME, subfolder=subfolder, **allowed))
    except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end here
        raise FileNotFoundError(
            f"{directory} is not a local folder and its {CONFIG_NAME} could not be fetched from the Hugging Face "
            f"Hub ({error})."
        ) from None


def looks_like_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/"))


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig`` (Li et al. 2023): pass as ``LoraConfig(init_lora_weights="loftq", loftq_config=...)``.

    Args:
        loftq_bits: bits of the quantized base weight (lorakit: 4, NF4 with double quantization).
        loftq_iter: alternating steps of quantization and rank-r SVD of the residual (LoftQ's ``T``).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of a LoRA adapter (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    A wrapped layer computes ``h = W0 x + scaling * B A dropout(x)`` with ``A`` (r x in), ``B`` (out x r) and
    ``scaling = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023).

    Args:
        task_type: a :class:`TaskType` (or its name); decides which heads are trained and saved in full.
        target_modules: list of names, each matching a module whose full name equals it or ends with ``.name``;
            a string is a regular expression matched against the full name; ``"all-linear"`` means every
            Linear / Conv1D layer except the output head.
        exclude_modules: same matching rules; these modules are never adapted.
        r: rank of the update (> 0).
        lora_alpha: numerator of the scaling.
        lora_dropout: dropout probability on the adapter input, in [0, 1).
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted layers train).
        fan_in_fan_out: the base weight is stored (in, out), as in GPT-2's Conv1D (set automatically for Conv1D).
        use_rslora: rank-stabilized scaling ``alpha / sqrt(r)``.
        use_dora: weight-decomposed LoRA (Liu et al. 2024): ``W' = m * (W0 + s BA) / ||W0 + s BA||_row``.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a classification head).
        init_lora_weights: ``True`` = A kaiming-uniform and B zero (output equals the base model at start);
            ``"gaussian"`` = A normal with std 1/r, B zero; ``False`` = both random (tests of merging);
            ``"pissa"`` / ``"pissa_niter_K"`` (Meng et al. 2024) and ``"olora"`` (Büyükakyüz 2024) = A and B from
            the base weight's SVD / QR, the base weight becoming the residual ``W0 - s B A``; ``"loftq"`` (Li et
            al. 2023, with ``loftq_config``) = the base quantized to 4-bit NF4 jointly with A and B (see
            :mod:`lorakit.initializers`). These four apply to Linear layers (others keep the default init).
        loftq_config: :class:`LoftQConfig` fields (``loftq_bits``, ``loftq_iter``) for ``init_lora_weights="loftq"``.
        layers_to_transform: layer indices to adapt (with ``layers_pattern`` naming the layer list).
        layers_pattern: name(s) of the module list holding the layers, e.g. ``"layers"`` or ``"h"``.
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha, keyed by name or regex.
        inference_mode: freeze everything (adapters loaded for inference).
        base_model_name_or_path: the model the adapter was trained on (filled in when saving).
        revision: the revision (branch, tag or commit) of that base model, if not the default.
    """

    task_type: TaskType | str | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    loftq_config: dict[str, Any] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_type: PeftType = field(default=PeftType.LORA, init=False)

    def __post_init__(self) -> None:
        self.task_type = TaskType.parse(self.task_type)
        if dataclasses.is_dataclass(self.loftq_config):
            self.loftq_config = dataclasses.asdict(self.loftq_config)
        self.loftq_config = dict(self.loftq_config or {})
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and the accepted values."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the adapter rank), got {self.r!r}.")
        for name, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{name!r}] must be a positive integer, got {rank!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if not math.isfinite(float(self.lora_alpha)):
            raise ValueError(f"lora_alpha must be a finite number, got {self.lora_alpha!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        from lorakit.initializers import parse_init

        parse_init(self.init_lora_weights)  # raises naming the accepted values
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError(
                    "init_lora_weights='loftq' needs loftq_config, e.g. loftq_config=LoftQConfig(loftq_bits=4, "
                    "loftq_iter=1) (PEFT's class and fields)."
                )
            if self.loftq_config.get("loftq_bits", 4) != 4:
                raise ValueError(
                    f"lorakit's LoftQ quantizes to 4-bit NF4; loftq_bits must be 4, got {self.loftq_config}."
                )
        elif self.loftq_config:
            warnings.warn("loftq_config is ignored unless init_lora_weights='loftq'.", stacklevel=3)
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("layers_pattern only makes sense together with layers_to_transform.")
        if isinstance(self.target_modules, str) and self.layers_to_transform:
            raise ValueError("layers_to_transform needs target_modules as a list, not a regex string.")

    def scaling_for(self, rank: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scaling(alpha, rank, self.use_rslora)


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor of the LoRA update: ``alpha / r`` (Hu et al. 2021, sec. 4.1), or ``alpha / sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", theorem 3.2)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def load_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """Read an adapter folder's config, choosing the config class from its ``peft_type``."""
    path = Path(directory) / CONFIG_NAME
    peft_type = LoraConfig.peft_type_name()
    if path.is_file():  # else from_pretrained says it is missing (or fetches it from the Hub)
        peft_type = read_config_json(path).get("peft_type", peft_type)
    return config_class_for(peft_type, where=str(path)).from_pretrained(directory)


def config_class_for(peft_type: str, where: str = "config") -> type:
    """The config class whose ``peft_type`` is ``peft_type`` (``"LORA"``, ``"ADALORA"``, ...), from the method table."""
    from lorakit.methods import method_for_type

    try:
        return method_for_type(peft_type).config_class
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def config_classes() -> tuple[type, ...]:
    """Every config class of the method table (:data:`lorakit.methods.METHODS`)."""
    from lorakit.methods import METHODS

    return tuple(dict.fromkeys(method.config_class for method in METHODS))
