"""JSON files of the io formats (COCO, SA-1B): written atomically, read with one clear ValueError."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from .atomic import atomic_write_text

PathLike = Union[str, os.PathLike]


def write_json(path: PathLike, doc: Any) -> Path:
    atomic_write_text(path, json.dumps(doc))
    return Path(path)


def read_json(path: PathLike, what: str) -> Any:
    """The parsed file; a missing, unreadable or malformed file is a ValueError naming `what` it should be."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {what} file {path}: {exc}") from None
