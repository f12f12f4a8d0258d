"""The embedded SmolLM2-135M-Instruct, converted for real once per test session into a temporary cache.

Several test modules (models and data) need the real model or tokenizer; ``converted()`` runs the GGUF ->
safetensors conversion on first use and returns the cache root and the in-memory GGUF-loaded model, so the
~30 s conversion happens once per session.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorakit.models import embedded_gguf_path  # noqa: E402
from lorakit.models.embedded import EMBEDDED_CACHE_NAME  # noqa: E402
from lorakit.models.gguf_cache import convert_gguf  # noqa: E402


@functools.lru_cache(maxsize=1)
def converted() -> tuple[Path, Any, Any]:
    """(cache root, GGUF-loaded model, GGUF-loaded tokenizer) after converting into ``<root>/models/...``."""
    root = Path(tempfile.mkdtemp(prefix="lorakit-test-cache-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    model, tokenizer = convert_gguf(embedded_gguf_path(), root / "models" / EMBEDDED_CACHE_NAME)
    return root, model.eval(), tokenizer


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """The SmolLM2 tokenizer as lorakit loads it from the converted cache."""
    from lorakit.models import load_tokenizer

    return load_tokenizer(None, cache_dir=converted()[0])
