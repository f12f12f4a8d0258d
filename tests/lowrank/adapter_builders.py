"""Write small adapter folders for the tests: hand-made matrices, or saved by Hugging Face PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.conftest import tiny_llama  # noqa: F401 - re-exported for the inspect tests

PREFIX = "base_model.model."


def write_adapter(folder: Path, config: dict, tensors: dict[str, np.ndarray]) -> Path:
    """Save ``config`` as adapter_config.json and ``tensors`` (keys without the prefix) as safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    payload = {
        PREFIX + key: torch.tensor(np.asarray(value), dtype=torch.float32) for key, value in tensors.items()
    }
    save_file(payload, str(folder / "adapter_model.safetensors"))
    return folder


def lora_pair(module: str, B: np.ndarray, A: np.ndarray) -> dict[str, np.ndarray]:
    return {f"{module}.lora_A.weight": A, f"{module}.lora_B.weight": B}


def save_peft_adapter(folder: Path, model, peft_config, seed: int = 0):
    """Wrap ``model`` with PEFT (non-zero B via init_lora_weights=False), save it, return the PeftModel."""
    import peft

    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, peft_config)
    peft_model.save_pretrained(str(folder))
    return peft_model


def peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's own get_delta_weight for every adapted module, keyed by module path (no prefix)."""
    deltas = {}
    for name, module in peft_model.named_modules():
        if (
            hasattr(module, "get_delta_weight")
            and hasattr(module, "lora_A")
            and "default" in _adapter_names(module)
        ):
            deltas[name.removeprefix(PREFIX)] = module.get_delta_weight("default").detach().double()
    return deltas


def _adapter_names(module) -> set[str]:
    names = set(module.lora_A.keys())
    names |= set(getattr(module, "lora_embedding_A", {}).keys())
    return names
