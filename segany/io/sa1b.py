"""SA-1B per-image annotation files (the Segment Anything dataset's layout), written atomically.

    {"image": {"image_id", "width", "height", "file_name"},
     "annotations": [{"id", "segmentation": {"size": [h, w], "counts": "<COCO RLE>"}, "bbox": [x, y, w, h],
                      "area", "predicted_iou", "stability_score", "crop_box": [x, y, w, h], "point_coords"}]}

Generator records have every field. Records without some of the optional ones (manual masks have no
stability score or crop box) leave them out; a record's own "id" is kept.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Union

import numpy as np

from . import rle as rle_io
from .jsonfile import read_json, write_json

PathLike = Union[str, os.PathLike]


def to_coco_rle(segmentation: Any) -> Dict[str, Any]:
    """A binary mask, an uncompressed or a compressed RLE -> compressed COCO RLE (str counts)."""
    if isinstance(segmentation, dict):
        return rle_io.compress(segmentation)
    mask = np.asarray(segmentation)
    if mask.ndim != 2:
        raise ValueError(f"a segmentation must be an (H, W) mask or an RLE dict, got shape {mask.shape}")
    return rle_io.encode_coco(mask)[0]


def _points(value: Any) -> List[List[float]]:
    return [[float(x), float(y)] for x, y in value]


def _box(value: Any) -> List[float]:
    box = [float(v) for v in value]
    if len(box) != 4:
        raise ValueError(f"a box needs 4 numbers, got {len(box)}")
    return box


# The optional per-mask fields of SA-1B and how each is normalised (raises TypeError/ValueError if malformed).
OPTIONAL_FIELDS: Dict[str, Callable[[Any], Any]] = {
    "predicted_iou": float,
    "stability_score": float,
    "crop_box": _box,
    "point_coords": _points,
}


def sa1b_document(records: Sequence[Dict[str, Any]], image_info: Dict[str, Any]) -> Dict[str, Any]:
    """The SA-1B dict for one image from generator records (any output mode)."""
    for key in ("width", "height", "file_name"):
        if key not in image_info:
            raise ValueError(f"image_info needs {key!r}")
    annotations: List[Dict[str, Any]] = []
    for i, rec in enumerate(records):
        seg = to_coco_rle(rec["segmentation"])
        if seg["size"] != [int(image_info["height"]), int(image_info["width"])]:
            raise ValueError(f"mask {i} has size {seg['size']}, image is {image_info['height']}x{image_info['width']}")
        ann = {"id": int(rec.get("id", i + 1)), "segmentation": seg, "bbox": _box(rec["bbox"]), "area": int(rec["area"])}
        for key, normalise in OPTIONAL_FIELDS.items():
            if rec.get(key) is not None:
                ann[key] = normalise(rec[key])
        annotations.append(ann)
    image = {"image_id": int(image_info.get("image_id", 0)), "width": int(image_info["width"]),
             "height": int(image_info["height"]), "file_name": str(image_info["file_name"])}
    return {"image": image, "annotations": annotations}


def write_sa1b(path: PathLike, records: Sequence[Dict[str, Any]], image_info: Dict[str, Any]) -> Path:
    return write_json(path, sa1b_document(records, image_info))


def validate_sa1b(doc: Any) -> Dict[str, Any]:
    """Raise ValueError unless `doc` is a well-formed SA-1B per-image dict; returns it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), dict) or not isinstance(doc.get("annotations"), list):
        raise ValueError("an SA-1B file needs an 'image' object and an 'annotations' list")
    image = doc["image"]
    for key in ("width", "height", "file_name"):
        if key not in image:
            raise ValueError(f"SA-1B 'image' lacks {key!r}")
    size = [int(image["height"]), int(image["width"])]
    for i, ann in enumerate(doc["annotations"]):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "counts" not in seg or list(seg.get("size", [])) != size:
            raise ValueError(f"SA-1B annotation {i} has no RLE segmentation of the image's size {size}")
        for key in ("bbox", "area"):
            if key not in ann:
                raise ValueError(f"SA-1B annotation {i} lacks {key!r}")
    return doc


def read_sa1b(path: PathLike) -> Dict[str, Any]:
    """Load and check an SA-1B per-image file (ValueError if it is damaged or not SA-1B)."""
    return validate_sa1b(read_json(path, "SA-1B"))


def sa1b_masks(doc: Dict[str, Any]) -> np.ndarray:
    """(N, H, W) bool masks of an SA-1B dict."""
    image = doc["image"]
    if not doc["annotations"]:
        return np.zeros((0, int(image["height"]), int(image["width"])), dtype=bool)
    return np.stack([rle_io.decode(a["segmentation"]) for a in doc["annotations"]])


def sa1b_image_ids(stems: Sequence[str]) -> List[int]:
    """SA-1B image ids: the number of an SA-1B file name (sa_223750.jpg -> 223750) where every input has
    one and they are unique, else the image's position in the input (1, 2, ...)."""
    numbers = []
    for stem in stems:
        m = re.fullmatch(r"sa_(\d+)", stem)
        numbers.append(int(m.group(1)) if m else None)
    if None not in numbers and len(set(numbers)) == len(numbers):
        return numbers
    return list(range(1, len(stems) + 1))
