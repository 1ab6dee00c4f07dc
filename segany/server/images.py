"""Checked image intake: uploads and folder imports end up as <data>/images/<sha256>.<ext>.

A client's file name is only ever a display name (directories stripped); the stored name comes from
the content hash, so no name can reach outside the data folder. Content is checked by decoding it with
Pillow (format, size in bytes and in pixels), not by trusting the extension or the MIME type.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from ..io.atomic import atomic_write_bytes
from ..predict.inputs import CONVERTIBLE, HIGH_DEPTH_GRAY, TRANSPARENT

SUPPORTED_MODES = set(HIGH_DEPTH_GRAY) | set(TRANSPARENT) | set(CONVERTIBLE)
SUPPORTED_MODES.discard("La")  # premultiplied alpha: PIL cannot convert it

# Pillow format name -> extension of the stored file
FORMATS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif", "GIF": "gif"}
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class ImageRejected(ValueError):
    """The bytes are not an acceptable image; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 415) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CheckedImage:
    data: bytes
    sha256: str
    extension: str
    width: int  # after EXIF orientation, as the model and the browser see it
    height: int


def display_name(name: Optional[str]) -> str:
    """The last path component of a client-given name, without control characters; never '.' or '..'."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()[:200]
    if base in ("", ".", ".."):
        raise ImageRejected(f"invalid file name {name!r}", status=422)
    return base


def check_image_bytes(data: bytes, max_bytes: int, max_pixels: int) -> CheckedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ImageRejected(f"image is {len(data)} bytes, more than the limit of {max_bytes}", status=413)
    if not data:
        raise ImageRejected("the file is empty", status=422)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            if fmt not in FORMATS:
                raise ImageRejected(f"unsupported image format {fmt}; use one of {', '.join(sorted(FORMATS))}")
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
                    status=413,
                )
            probe.load()  # decodes fully: a truncated or corrupt file fails here
            if probe.mode not in SUPPORTED_MODES:
                raise ImageRejected(f"images in PIL mode {probe.mode} are not supported: save it as 8-bit RGB or grayscale")
            oriented = ImageOps.exif_transpose(probe)
            width, height = oriented.size
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(f"not a readable image: {exc}") from None
    return CheckedImage(data, hashlib.sha256(data).hexdigest(), FORMATS[fmt], width, height)


def store(image: CheckedImage, images_dir: Path) -> str:
    """Write the image under its content hash (once); returns the stored file name."""
    name = f"{image.sha256}.{image.extension}"
    target = images_dir / name
    if not target.is_file():
        atomic_write_bytes(target, image.data)
    return name


def resolve_import_folder(folder: str, roots: List[Path]) -> Path:
    """The folder to import from, which must lie inside one of the allowed roots (no escaping via ..)."""
    path = Path(folder).expanduser()
    try:
        resolved = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        raise ImageRejected(f"folder not found: {folder}", status=404) from None
    if not resolved.is_dir():
        raise ImageRejected(f"not a folder: {folder}", status=422)
    for root in roots:
        if resolved == root.resolve() or root.resolve() in resolved.parents:
            return resolved
    allowed = ", ".join(str(r) for r in roots)
    raise ImageRejected(f"folder {folder} is outside the import roots ({allowed})", status=403)


def folder_images(folder: Path, recursive: bool = False, max_files: int = 100_000) -> Tuple[List[Path], int]:
    """Image files in a folder (sorted by path) and how many other files were skipped.

    Hidden files and folders (.git, .cache, ...) are never entered nor counted, links leading outside the
    folder are skipped, and the names of skipped files are not reported (they may be anything). More
    than `max_files` entries is an error rather than a long silent walk.
    """
    found: List[Path] = []
    skipped = seen = 0
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if name.startswith("."):
                continue
            seen += 1
            if seen > max_files:
                raise ImageRejected(f"the folder holds more than {max_files} files; import a smaller one", 422)
            path = Path(root) / name
            if path.suffix.lower() not in EXTENSIONS or not path.is_file() or folder not in path.resolve().parents:
                skipped += 1
                continue
            found.append(path)
    return sorted(found), skipped
