"""Checks of a resolved :class:`~lorakit.train.config.TrainConfig`: value ranges, choices, combinations, and
the settings that need the model (``max_seq_length`` against its positions). Each failure is a
:class:`~lorakit.train.config.ConfigError` that names the key and the accepted values.
"""

from __future__ import annotations

import difflib
from typing import Any

from lorakit.train.config import (
    DATASET_FORMATS,
    DISTRIBUTED,
    FLOAT32_TINY,
    METHODS,
    PRECISIONS,
    SCHEDULERS,
    ConfigError,
    TrainConfig,
)
from lorakit.train.trackers import resolve_report_to


def _validate_run_options(config: TrainConfig) -> None:
    """Trackers, early stopping and dataset splits."""
    try:
        resolve_report_to(config.report_to)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.early_stopping_patience is not None:
        if config.early_stopping_patience < 1:
            raise ConfigError(
                f"'early_stopping_patience' must be >= 1 (or empty for off), got {config.early_stopping_patience}."
            )
        if config.eval_steps == 0:
            raise ConfigError("'early_stopping_patience' needs eval_steps > 0 (it counts evaluations).")
    if config.early_stopping_threshold < 0:
        raise ConfigError(f"'early_stopping_threshold' must be >= 0, got {config.early_stopping_threshold}.")
    if config.divergence_threshold is not None and not config.divergence_threshold > 0:
        raise ConfigError(
            f"'divergence_threshold' must be > 0 (or empty for off), got {config.divergence_threshold}."
        )
    if not config.dataset_split.strip():
        raise ConfigError("'dataset_split' needs a split name such as train.")
    if config.eval_dataset_split and config.dataset is None and config.eval_dataset is None:
        raise ConfigError("'eval_dataset_split' needs a dataset (or eval_dataset) with splits.")


def validate(config: TrainConfig) -> None:
    choices = {
        "method": METHODS,
        "lr_scheduler": SCHEDULERS,
        "precision": PRECISIONS,
        "dataset_format": DATASET_FORMATS,
        "compute_dtype": ("bf16", "fp16", "fp32"),
        "distributed": DISTRIBUTED,
    }
    for key, allowed in choices.items():
        value = getattr(config, key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"'{key}' must be one of {', '.join(allowed)}; got '{value}'.{hint}")
    positive = (
        "lora_r",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "max_seq_length",
        "learning_rate",
        "lora_alpha",
        "adam_epsilon",
    )
    for key in positive:
        if getattr(config, key) <= 0:
            raise ConfigError(f"'{key}' must be > 0, got {getattr(config, key)}.")
    if config.adam_epsilon < FLOAT32_TINY:
        raise ConfigError(
            f"'adam_epsilon' = {config.adam_epsilon} is 0 in float32 (the smallest normal float32 is about "
            f"1.2e-38), so AdamW would divide by zero; use 1e-8 (the default) or another value >= 1e-30."
        )
    non_negative = ("eval_steps", "save_steps", "max_grad_norm", "weight_decay", "warmup_ratio", "num_epochs")
    for key in non_negative:
        if getattr(config, key) < 0:
            raise ConfigError(f"'{key}' must be >= 0, got {getattr(config, key)}.")
    if config.max_steps is not None and config.max_steps <= 0:
        raise ConfigError(f"'max_steps' must be > 0 (or empty to use num_epochs), got {config.max_steps}.")
    if config.max_steps is None and config.num_epochs <= 0:
        raise ConfigError("Set num_epochs > 0 or max_steps.")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(config, key) < 1.0:
            raise ConfigError(f"'{key}' must be in [0, 1), got {getattr(config, key)}.")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise ConfigError(f"'lora_dropout' must be in [0, 1), got {config.lora_dropout}.")
    if not 0.0 <= config.eval_split < 1.0:
        raise ConfigError(f"'eval_split' must be in [0, 1), got {config.eval_split}.")
    if config.save_total_limit < 1:
        raise ConfigError(f"'save_total_limit' must be >= 1, got {config.save_total_limit}.")
    if config.logging_steps < 1:
        raise ConfigError(f"'logging_steps' must be >= 1, got {config.logging_steps}.")
    _validate_init(config)
    if config.loraplus_lr_ratio is not None and config.loraplus_lr_ratio <= 0:
        raise ConfigError(f"'loraplus_lr_ratio' must be > 0, got {config.loraplus_lr_ratio}.")
    _validate_run_options(config)


def _validate_init(config: TrainConfig) -> None:
    """``init_lora_weights`` spelled as PEFT's values (``true``/``false`` as words); LoRA and DoRA only."""
    from lorakit.initializers import parse_init

    value = str(config.init_lora_weights).strip()
    config.init_lora_weights = value.lower() if value.lower() in ("true", "false") else value
    try:
        parse_init({"true": True, "false": False}.get(config.init_lora_weights, config.init_lora_weights))
    except ValueError as error:
        raise ConfigError(f"'init_lora_weights': {error}") from None
    if config.init_lora_weights != "true" and config.method not in ("lora", "dora"):
        raise ConfigError(
            f"'init_lora_weights: {config.init_lora_weights}' applies to method lora or dora, not {config.method}."
        )
    if config.loftq_iter < 1:
        raise ConfigError(f"'loftq_iter' must be >= 1, got {config.loftq_iter}.")


def check_against_model(config: TrainConfig, model_config: Any) -> None:
    """Refuse a ``max_seq_length`` longer than the model's positions (:func:`check_max_seq_length`).

    Checked once the base model is loaded, before any data is read.
    """
    check_max_seq_length(config.max_seq_length, model_config)


def model_positions(model_config: Any) -> int | None:
    """The model's ``max_position_embeddings``, or None when its config does not say."""
    positions = getattr(model_config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def check_max_seq_length(max_seq_length: int, model_config: Any) -> None:
    """Raise :class:`ConfigError` when ``max_seq_length`` exceeds the model's positions.

    Longer sequences would index past learned position embeddings or stretch rotary ones beyond what the
    model was trained on, and the attention memory grows with the square of the length. Used by
    ``lorakit train`` (:func:`check_against_model`) and ``lorakit eval``.
    """
    positions = model_positions(model_config)
    if positions is not None and positions < max_seq_length:
        raise ConfigError(
            f"'max_seq_length' is {max_seq_length}, but the model has only {positions} positions "
            f"(max_position_embeddings); set max_seq_length to {positions} or less."
        )
