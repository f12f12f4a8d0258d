"""Loading a base model with an adapter (or a merged model) for merge, generate, chat and eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import PeftModel
from lorakit.config import read_config_json
from lorakit.models import load_model, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    """``base_model_name_or_path`` recorded in the adapter's ``adapter_config.json``.

    A missing file is a ``FileNotFoundError``; one that is not UTF-8 JSON a ``ValueError`` naming it.
    """
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter folder (no adapter_config.json).")
    return read_config_json(path).get("base_model_name_or_path")


def resolve_base(model: str | None, adapter: str | None) -> str | None:
    """``--model`` if given, else the adapter's recorded base, else the embedded default (None)."""
    if model:
        return model
    return adapter_base_model(adapter) if adapter else None


def load_for_inference(
    model: str | None,
    adapter: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "fp32",
    load_in_4bit: bool = False,
) -> tuple[nn.Module, Any]:
    """``(model in eval mode, tokenizer)``: base + adapter when ``adapter`` is given."""
    target = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    base = resolve_base(model, adapter)
    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    init = (
        read_config_json(Path(adapter) / "adapter_config.json").get("init_lora_weights") if adapter else None
    )
    loftq = init == "loftq"
    # a LoftQ adapter quantizes its layers itself, from the full-precision base (as when it was trained)
    network = load_model(base, dtype=DTYPES[dtype], load_in_4bit=load_in_4bit and not loftq, device=target)
    network.to(target)
    if loftq and load_in_4bit:
        from lorakit.config import PeftConfig
        from lorakit.train.setup import quantize_outside_targets

        quantize_outside_targets(network, PeftConfig.from_pretrained(adapter), torch.bfloat16)
    if adapter:
        from lorakit.train.setup import reproducible_init

        with reproducible_init(init):  # the residual base of a pissa_niter_K run, as the trainer made it
            network = PeftModel.from_pretrained(network, adapter)
        network.to(target)
    network.eval()
    return network, tokenizer
