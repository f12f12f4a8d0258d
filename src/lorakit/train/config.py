"""The training configuration: one flat dataclass, filled from defaults, a YAML file and flags.

Precedence is ``defaults < YAML file < command-line flags``. Every field is a YAML key and a flag;
``--lora_r 16``, ``--lora-r 16`` and ``--lora.r 16`` mean the same, and in YAML ``lora_r: 16`` equals
the nested form ``lora: {r: 16}``. Unknown keys are errors that suggest the closest valid key
(:func:`difflib.get_close_matches`). The defaults are the embedded default run: SmolLM2-135M-Instruct
on the bundled sample dataset, sized to finish in a few minutes on 2 CPU cores. Measured on the sample
(300 examples, about 57 tokens each): held-out loss 3.44 -> 0.79 after 10 steps, 0.58 after 20, 0.48 after
40, so ``max_steps`` defaults to 40 (half an epoch); for your own data set ``--max_steps none
--num_epochs N``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("lora", "dora", "adalora", "adapter")  # the rows of lorakit.methods.METHODS (a test checks)
SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DATASET_FORMATS = ("auto", "alpaca", "messages", "sharegpt", "text")
DISTRIBUTED = ("ddp", "fsdp")

# Short names people type; they map onto the real field.
ALIASES = {
    "r": "lora_r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "lr": "learning_rate",
    "epochs": "num_epochs",
    "batch_size": "micro_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "max_length": "max_seq_length",
    "scheduler": "lr_scheduler",
    "data": "dataset",
}


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


def _help(text: str, default: Any, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything ``lorakit train`` needs. Field defaults are the embedded default run."""

    # -- model and data
    model: str | None = _help("Base model: local folder, Hub id or .gguf file; empty = SmolLM2-135M.", None)
    dataset: str | None = _help(
        "Training data: a file (JSON/JSONL/CSV/Parquet, also .json.gz/.jsonl.gz/.arrow), a datasets folder "
        "(save_to_disk or data files) or a Hugging Face Hub dataset id; empty = bundled sample.",
        None,
    )
    dataset_config: str | None = _help(
        "Configuration (subset) of a Hub or folder dataset; empty = default.", None
    )
    dataset_split: str = _help("Split of dataset to train on.", "train")
    eval_dataset: str | None = _help(
        "Held-out data (same kinds as dataset); empty = bundled sample, eval_dataset_split or eval_split.",
        None,
    )
    eval_dataset_split: str | None = _help(
        "Held-out split: of eval_dataset (empty = train), or of dataset when eval_dataset is empty "
        "(e.g. validation; empty = hold out eval_split).",
        None,
    )
    eval_split: float = _help("Fraction of dataset held out when no eval_dataset is given.", 0.05)
    column_mapping: dict[str, str] | None = _help(
        "Rename the data's columns to lorakit's before formatting, e.g. question=instruction,response=output.",
        None,
    )
    dataset_format: str = _help(f"Record format: {'|'.join(DATASET_FORMATS)}.", "auto")
    train_on_prompt: bool = _help("Also train on prompt tokens (default: only on responses).", False)
    max_seq_length: int = _help("Longer sequences are truncated (and counted in the log).", 256)
    packing: bool = _help("Pack several examples into each sequence of max_seq_length.", False)
    # -- adapter
    method: str = _help(f"Adapter method: {'|'.join(METHODS)}.", "lora")
    lora_r: int = _help("LoRA rank r.", 16)
    lora_alpha: float = _help(
        "LoRA scaling alpha (update scaled by alpha/r, or alpha/sqrt(r) with rsLoRA).", 32.0
    )
    lora_dropout: float = _help("Dropout on the LoRA input.", 0.0)
    target_modules: list[str] | None = _help(
        "Module names to adapt; 'all-linear' = every Linear but the head.", None
    )
    modules_to_save: list[str] | None = _help("Extra modules trained fully and saved with the adapter.", None)
    use_rslora: bool = _help("rsLoRA scaling alpha/sqrt(r) (Kalajdzievski 2023).", False)
    use_dora: bool = _help("DoRA weight decomposition (Liu et al. 2024); same as method: dora.", False)
    init_lora_weights: str = _help(
        "Adapter init (LoRA/DoRA): true (A kaiming, B zero) | gaussian | pissa | pissa_niter_K | olora | loftq "
        "(LoftQ quantizes the adapted layers to 4-bit jointly with A and B; see docs/methods.md).",
        "true",
    )
    loftq_iter: int = _help("LoftQ alternating steps (with init_lora_weights: loftq).", 1)
    # -- optimisation
    learning_rate: float = _help("Peak AdamW learning rate.", 1e-3)
    loraplus_lr_ratio: float | None = _help("LoRA+ ratio lr_B/lr_A (Hayou et al. 2024); empty = off.", None)
    loraplus_lr_embedding: float = _help("LoRA+ learning rate of embedding adapters.", 1e-6)
    weight_decay: float = _help("AdamW weight decay (never applied to 1-D parameters).", 0.0)
    adam_beta1: float = _help("AdamW beta1.", 0.9)
    adam_beta2: float = _help("AdamW beta2.", 0.999)
    adam_epsilon: float = _help("AdamW epsilon.", 1e-8)
    lr_scheduler: str = _help(f"Learning-rate schedule after warm-up: {'|'.join(SCHEDULERS)}.", "cosine")
    warmup_steps: int | None = _help("Linear warm-up steps; empty = warmup_ratio * total steps.", None)
    warmup_ratio: float = _help("Warm-up as a fraction of total steps when warmup_steps is empty.", 0.1)
    num_epochs: float = _help("Passes over the training data (ignored when max_steps is set).", 1.0)
    max_steps: int | None = _help(
        "Total optimizer steps; overrides num_epochs ('none' to use num_epochs).", 40
    )
    micro_batch_size: int = _help("Sequences per forward pass (per process).", 4)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", 1)
    max_grad_norm: float = _help("Gradient clipping norm; 0 = off.", 1.0)
    seed: int = _help("Seed for adapter init, data order and dropout.", 42)
    precision: str = _help(f"Compute precision: {'|'.join(PRECISIONS)} (bf16/fp16 = autocast).", "fp32")
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", False)
    cpu_keep_freed_memory: bool = _help(
        "On CPU (glibc): keep freed memory for the next step instead of page-faulting it back (~10% faster).",
        True,
    )
    compile: bool = _help(
        "torch.compile the training forward (first steps compile; use packing for fixed shapes).", False
    )
    load_in_4bit: bool = _help("QLoRA: quantize the base model's Linear layers to 4-bit NF4.", False)
    compute_dtype: str = _help("Compute dtype of 4-bit layers: bf16|fp16|fp32.", "bf16")
    # -- run management
    output_dir: str = _help("Where adapter, checkpoints, metrics and plots go.", "runs/lorakit")
    eval_steps: int = _help("Evaluate on the held-out split every N steps (0 = only at start and end).", 20)
    save_steps: int = _help("Write a checkpoint every N steps (0 = only at the end).", 20)
    save_total_limit: int = _help("Keep the newest K checkpoints.", 2)
    logging_steps: int = _help("Write a metrics line every N steps.", 1)
    report_to: list[str] | None = _help(
        "Also log metrics to: none|tensorboard|wandb|mlflow|csv|all (every installed one); see docs/training.md.",
        None,
    )
    early_stopping_patience: int | None = _help(
        "Stop after N evaluations in a row without held-out improvement; empty = off.", None
    )
    early_stopping_threshold: float = _help(
        "Least decrease of the held-out loss that counts as an improvement.", 0.0
    )
    load_best_model_at_end: bool = _help(
        "Keep the best held-out adapter in best/ and write it as the final adapter (on with early stopping).",
        False,
    )
    divergence_threshold: float | None = _help(
        "Stop as diverged when a held-out loss exceeds the best so far by more than this x max(best, 2); "
        "empty = off (NaN/inf always stop).",
        0.5,
    )
    resume: bool = _help("Continue from the newest complete checkpoint in output_dir.", False)
    resume_allow_changes: list[str] | None = _help(
        "With resume: safe fields that may differ from the checkpoint's run, e.g. eval_steps,save_steps "
        "(others never may; see docs/training.md).",
        None,
    )
    overwrite_output_dir: bool = _help(
        "Start over even if output_dir holds checkpoints of an earlier run.", False
    )
    sample_prompts: list[str] | None = _help(
        "Prompts generated before/after training; empty = 3 held-out.", None
    )
    sample_max_new_tokens: int = _help("Tokens generated per sample prompt.", 48)
    device: str = _help("cpu | cuda | cuda:N | auto.", "auto")
    distributed: str = _help(
        "Under torchrun: ddp (each rank holds the whole model) | fsdp (FSDP2: parameters sharded over ranks).",
        "ddp",
    )
    fsdp_cpu_offload: bool = _help(
        "With distributed: fsdp on GPUs: keep the parameter shards in CPU memory.", False
    )


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
MAPPING_FIELDS = ("column_mapping",)  # dict-valued: a YAML mapping under these keys is a value, not nesting


def field_types() -> dict[str, Any]:
    """Resolved type hints of the config fields (the module uses postponed annotations)."""
    return typing.get_type_hints(TrainConfig)


def normalize_key(key: str) -> str:
    """``lora.r`` / ``lora-r`` / ``--lora_r`` -> ``lora_r``; aliases such as ``lr`` -> their field."""
    name = key.lstrip("-").replace(".", "_").replace("-", "_")
    return ALIASES.get(name, name)


def suggest_key(key: str) -> str:
    """A 'did you mean' hint for an unknown key, or an empty string."""
    candidates = list(FIELD_NAMES) + list(ALIASES)
    close = difflib.get_close_matches(normalize_key(key), candidates, n=1, cutoff=0.6)
    return f" Did you mean '{normalize_key(close[0])}'?" if close else ""


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(spelling, value)`` pairs; a nested key is spelled with dots (``lora: {r: 8}`` -> ``lora.r``)."""
    flat: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and normalize_key(name) not in MAPPING_FIELDS:
            flat.extend(_flatten(value, name))
        else:
            flat.append((name, value))
    return flat


def _same_value(key: str, first: Any, second: Any) -> bool:
    try:
        return coerce_value(key, first) == coerce_value(key, second)
    except ConfigError:
        return first == second


def resolve_spellings(pairs: list[tuple[str, Any]], source: str, *, flags: bool = False) -> dict[str, Any]:
    """``{field: value}`` from ``(spelling, value)`` pairs of one source (a YAML file, or the flags).

    Raises :class:`ConfigError` for an unknown key (suggesting the closest) and for one key given under two
    spellings with different values (``lora: {r: 8}`` and ``lora_r: 16``, or ``r`` and ``lora_r``), which
    would otherwise resolve silently by their order. The same value twice passes.
    """
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for raw_key, value in pairs:
        key = normalize_key(raw_key)
        if key not in FIELD_NAMES:
            flat = raw_key.replace(".", "_")
            where = f"Unknown option '--{raw_key}'." if flags else f"Unknown key '{flat}' in {source}."
            raise ConfigError(f"{where}{suggest_key(raw_key)}")
        spelling = f"--{raw_key}" if flags else raw_key
        if key in values and not _same_value(key, values[key], value):
            raise ConfigError(
                f"'{key}' is set twice in {source}: as '{spelled[key]}' ({values[key]!r}) and as '{spelling}' "
                f"({value!r}). Keep one of them."
            )
        values[key], spelled[key] = value, spelling
    return values


def _parse_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"'{key}' must be true or false, got {value!r}.")


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of ``X | None``."""
    args = typing.get_args(hint)
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if is_union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # smallest normal float32: a smaller adam_epsilon is 0 in float32


def _finite(key: str, value: float) -> float:
    """``value``, or a :class:`ConfigError` for NaN and infinities (``max_grad_norm: nan`` would turn clipping
    off and ``learning_rate: nan`` poison the first step; no option has a use for them)."""
    if not math.isfinite(value):
        raise ConfigError(f"'{key}' must be a finite number, got {value}.")
    if abs(value) > FLOAT32_MAX:  # training runs in float32 (or less): such a value overflows to inf there
        raise ConfigError(
            f"'{key}' = {value} is beyond float32's range (about 3.4e38); training would overflow."
        )
    return value


def coerce_value(key: str, value: Any) -> Any:
    """Convert a YAML or flag value to the field's type, with a clear error when it cannot be."""
    hint, optional = _base_type(field_types()[key])
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in ("", "none", "null")
    ):
        if optional:
            return None
        raise ConfigError(f"'{key}' needs a value.")
    try:
        if hint is bool:
            return _parse_bool(value, key)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if hint is float:
            return _finite(key, float(value))
        if typing.get_origin(hint) is dict:
            return _parse_mapping(key, value)
        if typing.get_origin(hint) is list:
            items = value if isinstance(value, list | tuple) else str(value).split(",")
            return [str(item).strip() for item in items if str(item).strip()]
        return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError, OverflowError):  # int("inf") overflows
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"'{key}' must be {name}, got {value!r}.") from None


def _parse_mapping(key: str, value: Any) -> dict[str, str]:
    """A YAML mapping, a JSON object string, or ``a=b`` / ``a:b`` items (a list or a comma string)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"'{key}' is not a valid JSON object: {value!r}.") from None
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    mapping: dict[str, str] = {}
    for item in (str(i).strip() for i in items):
        separator = "=" if "=" in item else ":"
        source, found, target = item.partition(separator)
        if not (found and source.strip() and target.strip()):
            raise ConfigError(
                f"'{key}' must map column names, e.g. question=instruction,response=output; got {item!r}."
            )
        mapping[source.strip()] = target.strip()
    return mapping


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a validated :class:`TrainConfig` from defaults updated by ``values``."""
    resolved = {key: coerce_value(key, v) for key, v in resolve_spellings(_flatten(values), source).items()}
    if resolved.get("method") == "dora" and resolved.get("use_dora") is False:
        raise ConfigError(
            f"{source}: 'method: dora' and 'use_dora: false' contradict each other (method dora is DoRA). "
            "Drop use_dora, or choose method lora."
        )
    config = TrainConfig(**resolved)
    if config.method == "dora":
        config.use_dora = True
    if config.report_to is not None:  # "--report_to csv,tensorboard" arrives as one list item
        config.report_to = [
            n.strip().lower() for item in config.report_to for n in item.split(",") if n.strip()
        ]
    from lorakit.train.config_checks import validate  # it imports this module

    validate(config)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (not "the last one wins")."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"'{key}' is given twice in one mapping (lines {seen[key]} and {line}); keep one of them."
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (safe loader); an empty file is an empty config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' not found.")
    raw = path.read_bytes()
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ConfigError(
            f"Config file '{path}' is not UTF-8 text (byte {raw[error.start]:#04x} on line {line}); a config is "
            "a YAML text file of key: value lines."
        ) from None
    except yaml.reader.ReaderError as error:  # binary content: control characters YAML does not allow
        line = raw.decode("utf-8").count("\n", 0, error.position) + 1
        code = error.character if isinstance(error.character, int) else ord(error.character)
        raise ConfigError(
            f"Config file '{path}' is not a YAML text file: it holds the control character U+{code:04X} on "
            f"line {line}. A config is a text file of key: value lines."
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"Config file '{path}' must be a mapping of key: value lines (YAML), but it holds a "
            f"{type(data).__name__}."
        )
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (flags)."""
    values = resolve_spellings(_flatten(read_yaml(path)), str(path)) if path is not None else {}
    flags = resolve_spellings(list((overrides or {}).items()), "the flags", flags=True)
    if "method" in flags and "use_dora" not in flags:
        values.pop("use_dora", None)  # --method decides about DoRA over the file's use_dora
    values.update(flags)
    source = " with ".join(name for name, given in ((str(path), path), ("the flags", flags)) if given)
    return config_from_dict(values, source=source or "flags")


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config as YAML that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, default_flow_style=False)
