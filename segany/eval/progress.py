"""Resumable evaluation: each finished image's records are appended to a JSONL log, so an interrupted
run continues where it stopped instead of starting over.

The first line names the run (checkpoint SHA-256, mode, dataset, protocols, settings); a log written
by a different run is replaced, never mixed in. Each later line is one image. A line cut short by a
crash is ignored (that image is evaluated again).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Union

from ..io.atomic import atomic_write_text

PathLike = Union[str, os.PathLike]


class ProgressLog:
    def __init__(self, path: PathLike, run: Dict[str, Any]) -> None:
        self.path = Path(path)
        self.run = json.loads(json.dumps(run))  # the form it has once read back
        self.done: Dict[str, Dict[str, List[Dict]]] = {}
        if self.path.is_file():
            self.done = self._read()
        if not self.done:
            atomic_write_text(self.path, json.dumps({"run": self.run}) + "\n")

    def _read(self) -> Dict[str, Dict[str, List[Dict]]]:
        done: Dict[str, Dict[str, List[Dict]]] = {}
        with open(self.path, "r", encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            return {}
        if header.get("run") != self.run:
            return {}
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run that was killed while writing it
            done[str(entry["image_id"])] = entry["records"]
        return done

    def append(self, image_id: Any, records: Dict[str, List[Dict]]) -> None:
        line = json.dumps({"image_id": image_id, "records": records}, default=_plain)
        with open(self.path, "a", encoding="utf-8") as handle:
            # after a crash mid-line, start on a fresh line (the broken one is skipped when read)
            handle.write(("" if _ends_with_newline(self.path) else "\n") + line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[str(image_id)] = json.loads(line)["records"]


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return True
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _plain(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the progress log")
