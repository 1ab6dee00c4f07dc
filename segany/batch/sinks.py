"""Where a batch run writes: per-image SA-1B JSON files and/or Parquet shards, each written whole.

Layout of the output folder (a local path or an fsspec URL such as s3://bucket/masks/):
    <id>.json                   SA-1B per-image file (format sa1b)
    shards/part-<hash>.parquet  one row per image of a batch (format parquet): image_id, file_name, width,
                                height, annotations (COCO RLE and the generator's fields), settings (JSON),
                                model (checkpoint SHA-256 prefix and mode)
    _segany/run.json            the model and settings of the run; a rerun with others is refused
    _segany/summary.json        the last run's counts, rate and failed images (id, reason)

Local files are written to a temporary name and renamed; on object stores one PUT is atomic. So an
existing file is always complete, and "done" is simply "present": a rerun lists the folder once.
A shard's name is a hash of its image ids, so a batch redone after a crash replaces its own shard.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Set

from ..io.atomic import atomic_write_bytes
from .sources import is_url

log = logging.getLogger("segany.batch")

FORMATS = ("sa1b", "parquet", "sa1b+parquet")
SHARDS = "shards"
META = "_segany"


def formats_of(fmt: str) -> Set[str]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return set(fmt.split("+"))


def join(root: str, *parts: str) -> str:
    if is_url(root):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def write_bytes(url: str, data: bytes) -> None:
    if is_url(url):
        import fsspec

        with fsspec.open(url, "wb") as handle:
            handle.write(data)
    else:
        atomic_write_bytes(url, data)


def read_text(url: str) -> str:
    if is_url(url):
        import fsspec

        with fsspec.open(url, "rt", encoding="utf-8") as handle:
            return handle.read()
    return Path(url).read_text(encoding="utf-8")


def exists(url: str) -> bool:
    if is_url(url):
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    return Path(url).is_file()


def make_dirs(root: str) -> None:
    if is_url(root):
        import fsspec

        fs, path = fsspec.core.url_to_fs(root)
        fs.makedirs(path, exist_ok=True)
    else:
        Path(root, SHARDS).mkdir(parents=True, exist_ok=True)
        Path(root, META).mkdir(parents=True, exist_ok=True)


def _list(folder: str) -> List[str]:
    """File names directly in `folder` (none if it does not exist)."""
    if is_url(folder):
        import fsspec

        fs, path = fsspec.core.url_to_fs(folder)
        if not fs.exists(path):
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    root = Path(folder)
    return [p.name for p in root.iterdir() if p.is_file()] if root.is_dir() else []


def shard_name(ids: Sequence[str]) -> str:
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


# ----------------------------------------------------------------------------- Parquet

def _schema():
    import pyarrow as pa

    rle = pa.struct([("size", pa.list_(pa.int64())), ("counts", pa.string())])
    annotation = pa.struct([
        ("id", pa.int64()), ("segmentation", rle), ("bbox", pa.list_(pa.float64())), ("area", pa.int64()),
        ("predicted_iou", pa.float64()), ("stability_score", pa.float64()),
        ("crop_box", pa.list_(pa.float64())), ("point_coords", pa.list_(pa.list_(pa.float64()))),
    ])
    return pa.schema([
        ("image_id", pa.string()), ("file_name", pa.string()), ("width", pa.int64()), ("height", pa.int64()),
        ("annotations", pa.list_(annotation)), ("settings", pa.string()), ("model", pa.string()),
    ])


def parquet_row(image_id: str, doc: Dict[str, Any], settings: str, model: str) -> Dict[str, Any]:
    image = doc["image"]
    return {"image_id": image_id, "file_name": image["file_name"], "width": image["width"],
            "height": image["height"], "annotations": doc["annotations"], "settings": settings, "model": model}


def write_shard(out: str, rows: List[Dict[str, Any]]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = shard_name([r["image_id"] for r in rows])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), buffer, compression="zstd")
    write_bytes(join(out, SHARDS, name), buffer.getvalue())
    return name


def read_shards(out: str) -> List[Dict[str, Any]]:
    """Every row of every shard (for tests and small outputs; use pyarrow.dataset for large ones)."""
    import pyarrow.parquet as pq

    rows: List[Dict[str, Any]] = []
    for name in sorted(n for n in _list(join(out, SHARDS)) if n.endswith(".parquet")):
        rows.extend(pq.read_table(_open(join(out, SHARDS, name))).to_pylist())
    return rows


def _open(url: str):
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return url


def shard_ids(out: str) -> Set[str]:
    import pyarrow.parquet as pq

    ids: Set[str] = set()
    for name in _list(join(out, SHARDS)):
        if not name.endswith(".parquet"):
            continue
        try:
            ids.update(pq.read_table(_open(join(out, SHARDS, name)), columns=["image_id"]).column(0).to_pylist())
        except Exception as exc:  # not ours or damaged by hand: its images are redone, the file kept aside
            log.warning("ignoring unreadable shard %s: %s", name, exc)
    return ids


# ----------------------------------------------------------------------------- resume

def done_ids(out: str, formats: Set[str], suffix: str = ".json") -> Set[str]:
    """Ids already finished: in a shard when Parquet is written (shards are written last), else a JSON."""
    if "parquet" in formats:
        return shard_ids(out)
    return {n[: -len(suffix)] for n in _list(out) if n.endswith(suffix) and not n.startswith(".")}


def check_run(out: str, run: Dict[str, Any], *, write: bool = True) -> None:
    """Record the run's model and settings; refuse to mix outputs of another model or other settings.

    write=False compares only the keys given and records nothing (a quick check before the checkpoint
    is hashed and Ray started)."""
    path = join(out, META, "run.json")
    if exists(path):
        try:
            previous = json.loads(read_text(path))
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous is not None and not write:
            previous = {k: previous.get(k) for k in run}
        if previous is not None and previous != run:
            changed = sorted(k for k in set(run) | set(previous) if run.get(k) != previous.get(k))
            raise ValueError(
                f"{out} holds outputs of another run (different {', '.join(changed)}); use a new --out folder"
            )
    if write:
        write_bytes(path, json.dumps(run, indent=1, sort_keys=True).encode())


def write_summary(out: str, summary: Dict[str, Any]) -> None:
    write_bytes(join(out, META, "summary.json"), json.dumps(summary, indent=1).encode())


def ids_in(rows: Iterable[Dict[str, Any]]) -> List[str]:
    return [r["image_id"] for r in rows]
