"""Random-number-generator states as tensors, so checkpoints hold them in safetensors (no pickle).

Captured: torch CPU, every CUDA device, Python's ``random`` (Mersenne Twister: 624 words + position,
plus the cached Gaussian) and NumPy's legacy global generator (same layout). Restoring them makes
dropout masks and any other draws after a resume identical to an uninterrupted run.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def capture_rng_state() -> dict[str, torch.Tensor]:
    """All global RNG states of this process as named tensors."""
    version, words, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch_cpu": torch.get_rng_state().clone(),
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_meta": torch.tensor([version, math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_meta": torch.tensor([position, has_gauss, cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda_{index}"] = cuda_state.clone()
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored where devices exist."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    version, gauss = state["python_meta"].tolist()
    words = tuple(int(w) for w in state["python_words"].tolist())
    random.setstate((int(version), words, None if math.isnan(gauss) else gauss))
    position, has_gauss, cached = state["numpy_meta"].tolist()
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(position), int(has_gauss), float(cached)))
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            if f"cuda_{index}" in state:
                torch.cuda.set_rng_state(state[f"cuda_{index}"].to(torch.uint8), index)
