"""Deploy a trained adapter outside Python: GGUF files for llama.cpp and Ollama (``lorakit export --gguf``).

* :func:`export_gguf_adapter`: a llama.cpp LoRA adapter GGUF, used next to the base model's GGUF
  (``llama-cli -m base.gguf --lora adapter.gguf``, Ollama's ``ADAPTER``);
* :func:`export_gguf_merged`: the base GGUF with the adapter merged into its weights, a standalone model.

See docs/export.md for the format, the commands and the limits.
"""

from lorakit.export.errors import ExportError
from lorakit.export.gguf_export import ExportReport, export_gguf_adapter, export_gguf_merged

__all__ = ["ExportError", "ExportReport", "export_gguf_adapter", "export_gguf_merged"]
