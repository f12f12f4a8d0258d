"""Data read with the Hugging Face ``datasets`` library: Hub ids, folders, Arrow and compressed files.

Which sources come here (everything else goes to lorakit's own line-numbered readers in
:mod:`lorakit.data.readers`):

* a Hub dataset id such as ``tatsu-lab/alpaca``: ``datasets.load_dataset(id, name=config, split=split)``,
  downloaded to and re-read from the ``datasets`` cache (offline with ``HF_HUB_OFFLINE=1`` once cached);
* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``datasets.load_from_disk``;
* any other folder (data files, laid out like a Hub repository): ``datasets.load_dataset(folder, ...)``;
* ``.arrow`` files and compressed ``.json(l)/.csv/.tsv/.parquet`` + ``.gz/.bz2/.xz``: the ``arrow`` /
  ``json`` / ``csv`` / ``parquet`` builders on that one file, whose only split is ``train``.

``split`` accepts the ``datasets`` slice syntax (``train[:1000]``). An unknown split is an error listing the
available ones. Rows become :class:`~lorakit.data.errors.Record` objects located as ``row N``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.data.errors import DatasetError, Record

COMPRESSIONS = {".gz", ".bz2", ".xz"}
BUILDERS = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".ndjson": ("json", {}),
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".parquet": ("parquet", {}),
    ".pq": ("parquet", {}),
    ".arrow": ("arrow", {}),
}
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top of its folder


def file_builder(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The ``datasets`` builder for a single file read through ``datasets`` (None: not such a file)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".arrow":
        return BUILDERS[".arrow"]
    if len(suffixes) >= 2 and suffixes[-1] in COMPRESSIONS and suffixes[-2] in BUILDERS:
        return BUILDERS[suffixes[-2]]
    return None


def _import_datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{source!r} is not a plain data file, so it is read as a Hugging Face dataset (Hub id, datasets "
            "folder, Arrow or compressed file), but the package `datasets` is not installed: pip install "
            "datasets. Plain .jsonl/.json/.csv/.parquet files are read without it."
        ) from None
    return datasets


def load_with_datasets(source: str, split: str | None = None, config: str | None = None) -> list[dict]:
    """Split ``split`` (default ``train``) of a Hub id, ``datasets`` folder or Arrow/compressed file."""
    split = split or "train"
    path = Path(source).expanduser()
    datasets = _import_datasets(source)
    if path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS):
        dataset = _from_disk(datasets, path, split, config)
    elif path.is_file():
        builder, options = file_builder(path) or (None, {})
        if builder is None:
            raise DatasetError(f"{source}: not a file type read through datasets.")
        if split.split("[")[0] != "train" or config:
            raise DatasetError(
                f"{source} is a single file: its only split is 'train' and it has no configurations "
                f"(asked for split {split!r}{f', config {config!r}' if config else ''}). Put held-out data "
                "in eval_dataset."
            )
        dataset = _load(datasets, builder, split, source, data_files=str(path), **options)
    else:
        dataset = _load(datasets, str(path) if path.is_dir() else source, split, source, name=config)
    return [Record(dict(row), f"row {i + 1}") for i, row in enumerate(dataset)]


def _load(datasets: Any, path: str, split: str, source: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with lorakit's errors; ``name=None`` is left out (the default config)."""
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except Exception as error:  # datasets raises many types (network, missing config, bad split, ...)
        available = _split_names(datasets, path, kwargs) if "split" in str(error).lower() else None
        if available and split.split("[")[0] not in available:
            raise DatasetError(
                f"{source} has no split {split!r}; available splits: {', '.join(available)}. "
                "Set dataset_split / eval_dataset_split to one of them."
            ) from None
        config = f", config {kwargs['name']!r}" if "name" in kwargs else ""
        raise DatasetError(
            f"Could not load the Hugging Face dataset {source!r} (split {split}{config}): {error}"
        ) from None


def _split_names(datasets: Any, path: str, kwargs: dict[str, Any]) -> list[str] | None:
    """The split names of a dataset, asked only after a failed load (None when they cannot be found)."""
    if "data_files" in kwargs:
        return ["train"]
    try:
        return list(datasets.get_dataset_split_names(path, config_name=kwargs.get("name")))
    except Exception:  # the original error is then reported as it is
        return None


def _from_disk(datasets: Any, path: Path, split: str, config: str | None) -> Any:
    if config:
        raise DatasetError(f"{path} is a save_to_disk folder, which has no configurations (got {config!r}).")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise DatasetError(f"{path}: not a readable save_to_disk folder ({error}).") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(
                f"{path} has no split {split!r}; available splits: {', '.join(loaded)}. "
                "Set dataset_split / eval_dataset_split to one of them."
            )
        return loaded[split]
    own = str(loaded.split) if loaded.split else "train"
    if split not in ("train", own):
        raise DatasetError(
            f"{path} holds one saved Dataset (split {own!r}), so split {split!r} does not exist; "
            f"available splits: {own}."
        )
    return loaded
