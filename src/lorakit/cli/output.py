"""Result files of the sub-commands that take ``--output_dir`` (eval, generate, chat)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(output_dir: str | Path, name: str, data: Any) -> Path:
    """Write ``data`` as indented JSON to ``output_dir/name`` (creating the folder); returns the path."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
