"""The lorakit trainer: config, loop, checkpoints, metrics and plots, data-parallel training."""

from lorakit.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
