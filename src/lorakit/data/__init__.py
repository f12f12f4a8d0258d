"""Training data: reading files, chat formatting with answer-only loss masks, packing and batching.

Pipeline: :func:`load_records` (JSONL/JSON/CSV/Parquet, or through ``datasets``: a Hub id, a folder, Arrow or
compressed files; ``column_mapping`` renames columns) -> :func:`tokenize_records`
(alpaca / messages / ShareGPT / text, the tokenizer's chat template, labels -100 on the prompt) ->
optional :func:`pack_examples` -> :func:`collate` into padded tensors. See docs/data.md.
"""

from pathlib import Path

from lorakit.data.collate import collate, model_inputs
from lorakit.data.columns import rename_columns
from lorakit.data.errors import DatasetError, Record
from lorakit.data.formats import FORMATS, detect_format, record_to_example
from lorakit.data.packing import pack_examples
from lorakit.data.readers import load_records
from lorakit.data.render import chat_segments, has_chat_template, render_chat
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedDataset, count_targets, tokenize_records

SAMPLES_DIR = Path(__file__).parent / "samples"


def sample_dataset() -> tuple[Path, Path]:
    """The bundled (train, eval) JSONL files: alpaca-format questions answered in pirate speak.

    Made by ``samples/make_samples.py`` (deterministic); see docs/data.md for what the model learns from it.
    """
    return SAMPLES_DIR / "train.jsonl", SAMPLES_DIR / "eval.jsonl"


__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DatasetError",
    "Record",
    "TokenizedDataset",
    "chat_segments",
    "collate",
    "count_targets",
    "detect_format",
    "has_chat_template",
    "load_records",
    "model_inputs",
    "pack_examples",
    "record_to_example",
    "rename_columns",
    "render_chat",
    "sample_dataset",
    "tokenize_records",
]
