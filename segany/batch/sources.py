"""What a batch run reads: images named by an id, from folders, list files, manifests or SA-1B tar shards.

SOURCE may be
- an image file or URL;
- a folder (local or any fsspec URL such as s3://bucket/images/): its images, sorted;
- a list file (.txt/.lst/.list): one path or URL per line, relative paths relative to the list;
- a manifest (.csv with a header, or .jsonl/.ndjson): rows with `path` (or `url`/`uri`) and optionally `id`;
- a tar shard (.tar, as SA-1B's sa_000000.tar): the images inside it, read by byte range, never unpacked.

Ids name the outputs (<id>.json), so they must be unique and safe as file names. Without an explicit id
an image's id is its file stem; stems that collide get a short hash of the full path appended, the
same rule as the in-process `segany everything`.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from ..io.sa1b import sa1b_image_ids

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}
CSV_SUFFIXES = {".csv"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
TAR_SUFFIXES = {".tar"}


@dataclass(frozen=True)
class Item:
    """One image: `uri` a local path or fsspec URL; for a tar member, the byte range of its data."""

    id: str
    uri: str
    name: str  # the file name recorded in the outputs
    offset: int = -1  # >= 0: the image is bytes [offset, offset + size) of the file at `uri`
    size: int = -1
    image_id: int = 0  # the SA-1B image id (segany.io.sa1b.sa1b_image_ids over the whole input)

    def to_row(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Dict[str, Any]) -> "Item":
        return cls(str(row["id"]), str(row["uri"]), str(row["name"]), int(row["offset"]), int(row["size"]),
                   int(row.get("image_id", 0)))


def is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _local(text: str) -> str:
    return text[len("file://"):] if text.startswith("file://") else text


def _suffix(text: str) -> str:
    return Path(text.split("?", 1)[0]).suffix.lower()


def _name(text: str) -> str:
    return text.rstrip("/").split("?", 1)[0].rsplit("/", 1)[-1]


def _filesystem(url: str):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _join(base: str, entry: str) -> str:
    """`entry` relative to the folder holding `base` (a path or URL), unless it is absolute or a URL."""
    if is_url(entry) or Path(_local(entry)).is_absolute():
        return _local(entry)
    if is_url(base):
        return base.rsplit("/", 1)[0] + "/" + entry
    return str(Path(_local(base)).parent / entry)


def read_bytes(item: Item) -> bytes:
    """The encoded image of `item` (whole file, or its byte range inside a tar shard)."""
    if is_url(item.uri):
        import fsspec

        with fsspec.open(item.uri, "rb") as handle:
            if item.offset >= 0:
                handle.seek(item.offset)
                return handle.read(item.size)
            return handle.read()
    with open(item.uri, "rb") as handle:
        if item.offset >= 0:
            handle.seek(item.offset)
            data = handle.read(item.size)
            if len(data) != item.size:
                raise OSError(f"{item.uri} ends before member {item.name}")
            return data
        return handle.read()


def decode_image(data: bytes):
    """An HxWx3 uint8 RGB array, decoded as segany.predict.inputs.load_image decodes a file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from ..predict.inputs import load_image

    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError("not an image (unrecognised or damaged file)") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image: {exc}") from None
    return load_image(image)


def _folder(url: str, recursive: bool) -> List[str]:
    if not is_url(url):
        root = Path(_local(url))
        pattern = "**/*" if recursive else "*"
        return [str(p) for p in sorted(root.glob(pattern)) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    fs, path = _filesystem(url)
    entries = fs.find(path, maxdepth=None if recursive else 1)
    protocol = url.split("://", 1)[0]
    return sorted(f"{protocol}://{e}" for e in entries if _suffix(e) in IMAGE_SUFFIXES)


def _read_text(url: str) -> str:
    if is_url(url):
        import fsspec

        with fsspec.open(url, "rt", encoding="utf-8") as handle:
            return handle.read()
    return Path(_local(url)).read_text(encoding="utf-8")


def _manifest_rows(url: str) -> Iterable[Dict[str, Any]]:
    text = _read_text(url)
    if _suffix(url) in CSV_SUFFIXES:
        reader = csv.DictReader(io.StringIO(text))
        for line, row in enumerate(reader, start=2):
            yield line, {k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
    else:
        for line, raw in enumerate(text.splitlines(), start=1):
            if raw.strip():
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{url}:{line}: not a JSON object: {exc}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{url}:{line}: not a JSON object")
                yield line, {str(k).lower(): v for k, v in row.items()}


def _from_manifest(url: str) -> List[tuple]:
    out = []
    for line, row in _manifest_rows(url):
        location = next((row[k] for k in ("path", "url", "uri") if row.get(k)), None)
        if not location:
            raise ValueError(f"{url}:{line}: a manifest row needs a 'path' (or 'url'/'uri') column")
        ident = row.get("id")
        out.append((str(ident) if ident not in (None, "") else None, _join(url, str(location))))
    return out


def _from_tar(url: str) -> List[Item]:
    """The image members of a tar shard with their byte ranges (one pass over the headers)."""
    if is_url(url):
        import fsspec

        opener = fsspec.open(url, "rb")
    else:
        opener = open(_local(url), "rb")
    items = []
    try:
        with opener as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                if member.isfile() and _suffix(member.name) in IMAGE_SUFFIXES:
                    name = _name(member.name)
                    items.append(Item(Path(name).stem, _local(url), name, member.offset_data, member.size))
    except tarfile.TarError as exc:
        raise ValueError(f"cannot read tar shard {url}: {exc}") from None
    return items


def _check_id(ident: str, where: str) -> str:
    bad = not ident or len(ident) > 200 or ident.startswith(".") or any(c in ident for c in "/\\")
    if bad or not ident.isprintable():
        raise ValueError(f"{where}: id {ident!r} is not usable as a file name (no '/', '\\', leading '.' or "
                         "control characters, at most 200 characters)")
    return ident


def list_items(sources: Sequence[str], recursive: bool = False) -> List[Item]:
    """Every image of `sources`, in order, each once (a path given twice is kept once)."""
    explicit: List[Item] = []
    implicit: List[str] = []  # locations whose id is derived from the stem
    for source in sources:
        text = str(source)
        suffix = _suffix(text)
        local = None if is_url(text) else Path(_local(text))
        if local is not None and not local.exists():
            raise ValueError(f"not found: {local}")
        if (local is not None and local.is_dir()) or (local is None and text.endswith("/")):
            implicit.extend(_folder(text, recursive))
        elif suffix in TAR_SUFFIXES:
            explicit.extend(_from_tar(text))
        elif suffix in CSV_SUFFIXES | JSONL_SUFFIXES:
            for ident, location in _from_manifest(text):
                if ident is None:
                    implicit.append(location)
                else:
                    explicit.append(Item(_check_id(ident, text), location, _name(location)))
        elif suffix in LIST_SUFFIXES:
            for line in _read_text(text).splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    implicit.append(_join(text, line))
        elif local is not None and local.is_dir():
            implicit.extend(_folder(text, recursive))
        elif local is None and suffix not in IMAGE_SUFFIXES:
            implicit.extend(_folder(text, recursive))  # a URL without an image suffix: a folder
        else:
            implicit.append(_local(text))
    unique: Dict[str, str] = {}
    for location in implicit:
        key = location if is_url(location) else str(Path(location).resolve())
        unique.setdefault(key, location)
    stems: Dict[str, int] = {}
    for key in unique:
        stem = Path(_name(key)).stem
        stems[stem] = stems.get(stem, 0) + 1
    items = list(explicit)
    for key, location in unique.items():
        stem = Path(_name(key)).stem
        ident = stem if stems[stem] == 1 else f"{stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        items.append(Item(_check_id(ident, location), location, _name(location)))
    seen: Dict[str, Item] = {}
    for item in items:
        if item.id in seen:
            raise ValueError(f"two images share the id {item.id!r}: {seen[item.id].uri} and {item.uri}")
        seen[item.id] = item
    if not items:
        raise ValueError("no images found in " + ", ".join(map(str, sources)))
    ids = sa1b_image_ids([Path(item.name).stem for item in items])
    return [dataclasses.replace(item, image_id=image_id) for item, image_id in zip(items, ids)]
