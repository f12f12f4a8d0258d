"""Adapters and base GGUF files for the export tests: tiny random models, the embedded SmolLM2, read-back helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorakit.models.embedded import EMBEDDED_HUB_ID  # noqa: E402
from lorakit.serialization import WEIGHTS_NAME  # noqa: E402
from tests.models.gguf_builder import tiny_llama, write_tiny_gguf  # noqa: E402

TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY_HEADS, TINY_KV_HEADS = 4, 2


def tiny_base(folder: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF (F32 tensors, tied embeddings, q/k rows permuted as llama.cpp stores them)."""
    return write_tiny_gguf(folder / "tiny-base.gguf", tiny_llama(seed))


def tiny_peft(
    base_gguf: Path,
    config,
    seed: int = 0,
    scale: float = 1.0,
    magnitude_noise: float = 0.0,
    untied: bool = False,
):
    """lorakit's PeftModel over the tiny model ``base_gguf`` was written from, every factor random (``scale``)."""
    from lorakit import get_peft_model

    model = untied_tiny_llama(seed) if untied else tiny_llama(seed)
    model.config.name_or_path = str(base_gguf)
    peft = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if any(part in name for part in ("lora_A", "lora_B", "lora_E", "lora_embedding")):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "lora_magnitude_vector" in name and magnitude_noise:
                param.mul_(1 + magnitude_noise * torch.rand(param.shape, generator=generator))
    return peft.eval()


def save(peft, folder: Path) -> Path:
    peft.save_pretrained(folder)
    return folder


def write_adapter(folder: Path, tensors: dict[str, np.ndarray], **config) -> Path:
    """An adapter folder written directly: ``tensors`` (file keys -> arrays) and ``adapter_config.json``."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "base_model_name_or_path": EMBEDDED_HUB_ID}
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings), encoding="utf-8")
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, folder / WEIGHTS_NAME
    )
    return folder


def smollm2_factors(modules: dict[str, tuple[int, int]], rank: int = 8, seed: int = 0, scale: float = 0.05):
    """Random ``lora_A`` / ``lora_B`` file tensors for SmolLM2 module paths with their (out, in) shapes."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (out, inp) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = rng.standard_normal((rank, inp)) * scale
        tensors[f"base_model.model.{module}.lora_B.weight"] = rng.standard_normal((out, rank)) * scale
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def gguf_reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def fields(reader) -> dict:
    return {key: value.contents() for key, value in reader.fields.items() if not key.startswith("GGUF.")}


def tensors(reader) -> dict:
    return {tensor.name: tensor for tensor in reader.tensors}


def dequantized(tensor) -> np.ndarray:
    import gguf

    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)


def write_f32_copy(source: Path, target: Path) -> Path:
    """``source`` with every tensor dequantized to F32 (same metadata): llama.cpp then computes in float32."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, fields(reader)["general.architecture"])
    for key, value in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = value.types[0]
        sub = value.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.ascontiguousarray(dequantized(tensor), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def gguf_name(module: str) -> str:
    """``model.layers.1.self_attn.q_proj`` -> ``blk.1.attn_q.weight`` (llama)."""
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 64).get_name(module) + ".weight"


def untied_tiny_base(folder: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF with its own output head (``output.weight``), as untied models (Llama 3 8B, ...) have."""
    import gguf

    model = untied_tiny_llama(seed)
    tied_file = write_tiny_gguf(folder / "untied-without-head.gguf", model)
    reader = gguf.GGUFReader(tied_file)
    target = folder / "tiny-untied-base.gguf"
    writer = gguf.GGUFWriter(target, "llama")
    for key, value in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = value.types[0]
        sub = value.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data))
    writer.add_tensor("output.weight", model.lm_head.weight.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def untied_tiny_llama(seed: int = 0):
    from tests.conftest import tiny_llama as conftest_tiny_llama
    from tests.models.gguf_builder import vocabulary

    return conftest_tiny_llama(
        seed,
        vocab_size=len(vocabulary()),
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
