"""Mixed precision through the trainer (weights stay fp32, compute in bf16)."""

from __future__ import annotations

import torch

from lorakit.train.config import load_config
from lorakit.train.loop import train

from .helpers import adapter_tensors, tiny_run_flags


def test_bf16_autocast_trains(tiny_run_inputs, tmp_path) -> None:
    result = train(
        load_config(
            None,
            tiny_run_flags(
                tiny_run_inputs, tmp_path / "bf16", max_steps=3, precision="bf16", lora_dropout=0.1
            ),
        )
    )
    assert result.summary["eval_loss_end"] < result.summary["eval_loss_start"]
    assert all(
        t.dtype == torch.float32 for t in adapter_tensors(result.adapter_dir).values()
    )  # weights stay fp32
