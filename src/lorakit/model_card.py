"""The ``README.md`` model card written next to saved adapters, with the metadata PEFT's ``save_pretrained`` writes.

The card's YAML header gets ``library_name: peft`` (the files are PEFT's format, so the Hugging Face Hub offers
PEFT's loading code), ``base_model`` (the wrapped model's name, when it has one), ``tags`` (``lora``,
``transformers``, ``base_model:adapter:<name>`` and the base model's own ``model_tags``) and, for causal language
models, ``pipeline_tag: text-generation``. An existing README keeps its body: only its metadata is updated (its
own tags are kept as well, where PEFT replaces them), and a ``- lorakit <version>`` line is added under
``### Framework versions`` as PEFT adds its own version line.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from lorakit.config import PeftType, TaskType

FRAMEWORK_HEADING = "### Framework versions"


def base_model_name(model: nn.Module) -> str | None:
    """The name or path the model was loaded from (``config.name_or_path``), None when it has none."""
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def model_card_tags(peft_model: nn.Module) -> set[str]:
    """PEFT's tags for an adapter: the base model's ``model_tags``, ``transformers``, ``lora``, base-model link."""
    base = peft_model.get_base_model()
    tags = set(getattr(base, "model_tags", None) or [])
    try:
        from transformers import PreTrainedModel

        if isinstance(base, PreTrainedModel):
            tags.add("transformers")
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    config = peft_model.peft_config.get(peft_model.active_adapters[0]) if peft_model.active_adapters else None
    if getattr(config, "peft_type", None) == PeftType.LORA:
        tags.add("lora")
    name = getattr(base, "name_or_path", "") or ""
    if name:
        tags.add(f"base_model:adapter:{name}")
    return tags


def create_or_update_model_card(peft_model: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write (or update the metadata of) ``<output_dir>/README.md``; returns its path."""
    from huggingface_hub import ModelCard, ModelCardData

    from lorakit import __version__

    path = Path(output_dir) / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    tags = set(card.data.tags or []) | model_card_tags(peft_model)
    if tags:
        card.data["tags"] = sorted(tags)
    configs = [peft_model.peft_config.get(name) for name in peft_model.active_adapters]
    causal = any(getattr(c, "task_type", None) == TaskType.CAUSAL_LM for c in configs)
    if causal and not card.data.pipeline_tag:
        card.data.pipeline_tag = "text-generation"
    name = base_model_name(peft_model.get_base_model())
    if name:
        card.data["base_model"] = name
    lines = card.text.splitlines()
    version_line = f"- lorakit {__version__}"
    if version_line not in lines:
        if FRAMEWORK_HEADING in lines:
            lines.insert(lines.index(FRAMEWORK_HEADING) + 2, version_line)
        else:
            lines.append(f"{FRAMEWORK_HEADING}\n\n{version_line}")
    card.text = "\n".join(lines)
    card.save(path)
    return path
