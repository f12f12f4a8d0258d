"""An adapter folder read for export: one :class:`LoraModule` per adapted module, or a clear refusal.

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are read (never a pickle), in PEFT's key layout
(:mod:`lorakit.serialization`): ``<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight`` (out, r) for
a Linear layer, ``<module>.lora_embedding_A`` (r, num_embeddings) and ``<module>.lora_embedding_B`` (dim, r)
for an Embedding, ``<module>.lora_magnitude_vector`` (out,) for DoRA, and ``lora_A`` / ``lora_E`` / ``lora_B``
(no ``.weight``) for AdaLoRA.

Every module's update in the orientation of its weight (``W' = W + delta``) is

* LoRA: ``delta = s B A`` with ``s = alpha / r`` (Hu et al. 2021, sec. 4.1), ``alpha / sqrt(r)`` with rsLoRA
  (Kalajdzievski 2023); ``r`` and ``alpha`` per module from ``rank_pattern`` / ``alpha_pattern``;
* Embedding LoRA: ``delta = s (B A)^T`` of shape (num_embeddings, dim);
* AdaLoRA (Zhang et al. 2023): ``delta = B diag(E) A * alpha / (init_r + 1e-5)`` (``alpha <= 0``: ``init_r``),
  as :mod:`lorakit.adalora.layers` computes it;
* DoRA (Liu et al. 2024): ``W' = m * (W + s B A) / ||W + s B A||_row``, which needs ``W``; see
  :func:`merged_weight`.

What llama.cpp's LoRA GGUF (pairs ``lora_a`` / ``lora_b`` and one ``alpha``) or a merged GGUF cannot hold is refused
here with the reason and a way out (:func:`check_exportable`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorakit.config import CONFIG_NAME, lora_scaling, read_config_json
from lorakit.export.errors import ExportError
from lorakit.lowrank.adapter_files import pattern_value
from lorakit.serialization import WEIGHTS_NAME, load_adapter_weights

PEFT_PREFIX = "base_model.model."
ADALORA_RANKNUM_EPS = 1e-5  # lorakit.adalora.layers.RANKNUM_EPS: PEFT's divisor is ranknum + 1e-5
# file key suffix -> (factor, module kind)
_FACTORS = {
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
    ".lora_magnitude_vector": ("magnitude", None),
    ".lora_magnitude_vector.weight": ("magnitude", None),
    ".lora_A": ("A", "adalora"),
    ".lora_B": ("B", "adalora"),
    ".lora_E": ("E", "adalora"),
}
_RESIDUAL_INITS = ("pissa", "olora")


@dataclass
class LoraModule:
    """One adapted module: its factors as stored (float64), its scaling and, for DoRA, its magnitude."""

    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    kind: str  # "linear", "embedding" or "adalora"
    a: np.ndarray  # linear: (r, in); embedding: (r, num_embeddings); adalora: (r, in)
    b: np.ndarray  # linear: (out, r); embedding: (dim, r); adalora: (out, r)
    scaling: float
    rank: int
    e: np.ndarray | None = None  # AdaLoRA singular values (r, 1)
    magnitude: np.ndarray | None = None  # DoRA m, (out,)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the adapted weight (rows, columns): (out, in), or (num_embeddings, dim) for an Embedding."""
        if self.kind == "embedding":
            return (self.a.shape[1], self.b.shape[0])
        return (self.b.shape[0], self.a.shape[1])

    def delta(self) -> np.ndarray:
        """The dense update added to the weight (float64), in the weight's own orientation."""
        if self.kind == "embedding":
            return self.scaling * (self.b @ self.a).T
        if self.kind == "adalora":
            return self.scaling * (self.b @ (self.a * self.e))
        return self.scaling * (self.b @ self.a)

    def merged_weight(self, weight: np.ndarray) -> np.ndarray:
        """``W + delta`` (float64); for DoRA ``m * (W + delta) / ||W + delta||_row`` (lorakit's merge)."""
        combined = weight.astype(np.float64) + self.delta()
        if self.magnitude is None:
            return combined
        norm = np.linalg.norm(combined, axis=1)
        return combined * (self.magnitude / norm)[:, None]


@dataclass
class AdapterForExport:
    path: Path
    config: dict[str, Any]
    peft_type: str
    modules: list[LoraModule]

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def is_dora(self) -> bool:
        return any(module.magnitude is not None for module in self.modules)


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_adapter(folder: str | Path) -> AdapterForExport:
    """Read ``folder`` (config + safetensors weights); raise :class:`ExportError` for what export cannot use."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(
            f"{folder} is not an adapter folder; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}."
        )
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
        hint = f" Adapters in its sub-folders: {', '.join(nested)}; pass one of them." if nested else ""
        raise ExportError(f"{folder} has no {CONFIG_NAME}.{hint}")
    config = read_config_json(config_path)
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type == "BOTTLENECK_ADAPTER":
        raise ExportError(
            f"{folder} holds a bottleneck adapter (Houlsby et al.): it inserts new layers, "
            "h + W_up act(W_down h), after the target modules. Neither llama.cpp's LoRA GGUF (pairs of low-rank "
            "matrices added to existing weights) nor a merged model can hold that nonlinear block, and llama.cpp "
            "has no bottleneck adapters. Train a LoRA adapter (method: lora) to deploy with llama.cpp or Ollama."
        )
    if peft_type not in ("LORA", "ADALORA"):
        raise ExportError(
            f"{folder} holds a {peft_type} adapter; only LoRA and AdaLoRA adapters can be exported."
        )
    _check_init(config, folder)
    tensors = {
        key: value.detach().float().numpy().astype(np.float64)
        for key, value in load_adapter_weights(folder).items()
    }
    grouped, other = _group(tensors)
    _check_other_keys(other, config, folder)
    if not grouped:
        raise ExportError(f"{folder / WEIGHTS_NAME} holds no LoRA factors (lora_A / lora_B).")
    modules = [_module(name, parts, config, peft_type) for name, parts in sorted(grouped.items())]
    modules.sort(key=lambda module: natural_key(module.name))
    return AdapterForExport(folder, config, peft_type, modules)


def _check_init(config: dict[str, Any], folder: Path) -> None:
    init = config.get("init_lora_weights", True)
    kind = init.split("_")[0] if isinstance(init, str) else None
    if kind in _RESIDUAL_INITS:
        raise ExportError(
            f"{folder} is a {init!r} adapter: PiSSA / OLoRA train on top of a residual base W - s B0 A0, not on the "
            "base model's own weights, so its factors added to the base (a GGUF LoRA, or a merge into the base "
            "GGUF) would give another model. Convert it first to a plain LoRA over the original weights: save it "
            "with save_pretrained(out, path_initial_model_for_weight_conversion=<the initial adapter folder saved "
            "before training>), which writes A' = [A; A0], B' = [B, -B0] at rank 2r, and export that folder."
        )
    if kind == "loftq":
        raise ExportError(
            f"{folder} is a LoftQ adapter: its factors were fitted to the error of lorakit's own 4-bit NF4 "
            "quantization of the base (dequant(Q) + s B A ~ W), so they do not fit the GGUF base's weights. Export "
            "a LoRA trained with init_lora_weights true / gaussian, or merge it with lorakit merge (on the NF4 "
            "base) and convert the merged folder with llama.cpp's convert_hf_to_gguf.py."
        )


def _group(tensors: dict[str, np.ndarray]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    grouped: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for key, value in tensors.items():
        short = key.removeprefix(PEFT_PREFIX)
        for suffix, (part, kind) in _FACTORS.items():
            if short.endswith(suffix):
                parts = grouped.setdefault(short[: -len(suffix)], {})
                parts[part] = value
                if kind is not None:
                    parts.setdefault("kinds", set()).add(kind)
                break
        else:
            other.append(key)
    return grouped, sorted(other)


def _check_other_keys(other: list[str], config: dict[str, Any], folder: Path) -> None:
    if not other:
        return
    if config.get("modules_to_save"):
        raise ExportError(
            f"{folder} trains whole modules besides LoRA (modules_to_save={config['modules_to_save']}; saved in "
            f"full: {', '.join(other[:3])}{', ...' if len(other) > 3 else ''}). A llama.cpp LoRA GGUF holds only "
            "low-rank pairs (lora_a, lora_b) and this export does not write replacement tensors. Retrain without "
            "modules_to_save, or use lorakit merge and convert the merged folder with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    biases = [key for key in other if key.endswith(".bias")]
    if biases:
        raise ExportError(
            f"{folder} trains biases (bias={config.get('bias')!r}: {', '.join(biases[:3])}). A llama.cpp LoRA GGUF "
            "holds only low-rank pairs, no bias tensors, and this export does not replace them. Retrain with "
            "bias: none, or use lorakit merge and convert the merged folder with convert_hf_to_gguf.py."
        )
    raise ExportError(
        f"{folder / WEIGHTS_NAME} holds tensors that are not LoRA factors: {', '.join(other[:5])}. "
        "Only lora_A / lora_B (and lora_embedding_A / _B, DoRA magnitudes, AdaLoRA lora_E) can be exported."
    )


def _module(name: str, parts: dict[str, Any], config: dict[str, Any], peft_type: str) -> LoraModule:
    missing = [part for part in ("A", "B") if part not in parts]
    if missing:
        raise ExportError(f"module {name} has no lora_{missing[0]} tensor; the adapter file is incomplete.")
    kinds = parts.get("kinds", set())
    a, b = parts["A"], parts["B"]
    if peft_type == "ADALORA":
        return _adalora_module(name, parts, config)
    kind = "embedding" if "embedding" in kinds else "linear"
    if a.ndim != 2 or b.ndim != 2:
        raise ExportError(
            f"module {name} is a convolution (lora_A {a.shape}, lora_B {b.shape}); GGUF language models have "
            "no convolution weights to adapt."
        )
    if a.shape[0] != b.shape[1]:
        raise ExportError(f"module {name}: lora_B {b.shape} does not fit lora_A {a.shape} (ranks differ).")
    rank = a.shape[0]
    alpha = float(pattern_value(config.get("alpha_pattern"), name, config.get("lora_alpha", 8)))
    scaling = lora_scaling(alpha, rank, bool(config.get("use_rslora", False)))
    magnitude = parts.get("magnitude")
    if magnitude is not None:
        magnitude = magnitude.reshape(-1)
    return LoraModule(name, kind, a, b, scaling, rank, magnitude=magnitude)


def _adalora_module(name: str, parts: dict[str, Any], config: dict[str, Any]) -> LoraModule:
    a, b = parts["A"], parts["B"]
    e = parts.get("E")
    if e is None:
        raise ExportError(f"AdaLoRA module {name} has no lora_E; the adapter file is incomplete.")
    e = e.reshape(-1, 1)
    if not (a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1] == e.shape[0]):
        raise ExportError(
            f"AdaLoRA module {name}: lora_A {a.shape}, lora_E {e.shape}, lora_B {b.shape} do not fit."
        )
    init_r = int(config.get("init_r") or a.shape[0])
    alpha = float(config.get("lora_alpha", 8))
    scaling = (alpha if alpha > 0 else float(init_r)) / (init_r + ADALORA_RANKNUM_EPS)
    return LoraModule(name, "adalora", a, b, scaling, a.shape[0], e=e)


def check_adapter_mode(adapter: AdapterForExport) -> None:
    """Refuse what a llama.cpp LoRA GGUF (``lora_a`` / ``lora_b`` pairs, one ``alpha``) cannot express."""
    if adapter.peft_type == "ADALORA":
        init_r = adapter.config.get("init_r")
        raise ExportError(
            f"{adapter.path} is an AdaLoRA adapter: its update B diag(E) A * alpha / (init_r + 1e-5) has a "
            "singular-value vector E per layer, which a llama.cpp LoRA GGUF (lora_a, lora_b, one alpha) does not "
            "hold. Either export the merged model (lorakit export --gguf --merged ADAPTER OUT.gguf), or convert "
            "it to plain LoRA first: per layer A' = diag(E) A (rows of A times E), B' = B, rank r = the kept "
            f"rank, and lora_alpha' = r * alpha / (init_r + 1e-5) (here init_r = {init_r}); save that as a "
            "LoRA adapter folder and export it."
        )
    if adapter.is_dora:
        raise ExportError(
            f"{adapter.path} is a DoRA adapter: W' = m * (W + s B A) / ||W + s B A||_row rescales every output "
            "row by a trained magnitude m (lora_magnitude_vector), which a llama.cpp LoRA GGUF (an additive "
            "s B A only) cannot express. Export the merged model instead: lorakit export --gguf --merged "
            "ADAPTER OUT.gguf."
        )


def global_alpha(adapter: AdapterForExport) -> float:
    """The ``adapter.lora.alpha`` to write: llama.cpp scales each pair by ``alpha / r`` (r = lora_b's rank).

    lorakit's scaling is ``s = lora_alpha / r`` (plain) or ``lora_alpha / sqrt(r)`` (rsLoRA). With
    ``alpha_gguf = s * r`` llama.cpp's ``alpha_gguf / r`` equals ``s``: for plain LoRA ``alpha_gguf = lora_alpha``,
    for rsLoRA ``alpha_gguf = lora_alpha * sqrt(r)``, computed with the config's ``r`` and ``lora_alpha``.
    """
    config = adapter.config
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    return lora_scaling(alpha, rank, bool(config.get("use_rslora", False))) * rank


def fold_factor(module: LoraModule, alpha_gguf: float) -> float:
    """What ``lora_b`` is multiplied by so that llama.cpp's ``alpha_gguf / r`` gives ``module.scaling``.

    1 for every module with the config's ``r`` and ``lora_alpha``; a module with its own rank under rsLoRA, or
    its own alpha (``rank_pattern`` / ``alpha_pattern``), gets ``c = s_m * r_m / alpha_gguf``:
    ``(alpha_gguf / r_m) * (c B) A = s_m B A``.
    """
    wanted = module.scaling * module.rank
    if math.isclose(wanted, alpha_gguf, rel_tol=1e-12, abs_tol=0.0):
        return 1.0
    return wanted / alpha_gguf
