"""COCO instances JSON (images, annotations, categories), written atomically, read with checks.

    doc = coco_document()                                   # empty dataset, one category "object"
    add_image(doc, "a.jpg", height, width, records)         # generator records, any output mode
    write_coco("instances.json", doc)
    doc = read_coco("instances.json"); masks = annotation_mask(doc, doc["annotations"][0])

Segmentations are compressed RLE by default; polygons=True writes polygons (simplified by
`tolerance` pixels) for masks without holes, since COCO polygons cannot express holes, and RLE otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import polygons as poly_io
from . import rle as rle_io
from .atomic import atomic_write_text
from .sa1b import to_coco_rle

PathLike = Union[str, os.PathLike]
DEFAULT_CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object"}]


def coco_document(categories: Optional[List[Dict[str, Any]]] = None, description: str = "segany") -> Dict[str, Any]:
    return {
        "info": {"description": description},
        "licenses": [],
        "images": [],
        "annotations": [],
        "categories": list(categories or DEFAULT_CATEGORIES),
    }


def add_image(
    doc: Dict[str, Any],
    file_name: str,
    height: int,
    width: int,
    records: Sequence[Dict[str, Any]],
    category_id: int = 1,
    polygons: bool = False,
    tolerance: float = 1.0,
) -> int:
    """Append an image and its mask records; returns the new image id."""
    image_id = max((im["id"] for im in doc["images"]), default=0) + 1
    doc["images"].append({"id": image_id, "file_name": str(file_name), "height": int(height), "width": int(width)})
    next_id = max((a["id"] for a in doc["annotations"]), default=0) + 1
    for i, rec in enumerate(records):
        rle = to_coco_rle(rec["segmentation"])
        if rle["size"] != [int(height), int(width)]:
            raise ValueError(f"mask {i} has size {rle['size']}, image {file_name} is {height}x{width}")
        segmentation: Any = rle
        if polygons:
            polys = poly_io.mask_to_polygons(rle_io.decode(rle), tolerance)
            if polys and not poly_io.has_holes(polys):
                segmentation = poly_io.to_coco_polygons(polys)
        ann = {
            "id": next_id + i,
            "image_id": image_id,
            "category_id": int(category_id),
            "segmentation": segmentation,
            "area": int(rec.get("area", rle_io.area(rle))),
            "bbox": [float(v) for v in rec.get("bbox", rle_io.to_bbox(rle))],
            "iscrowd": 0,
        }
        for key in ("predicted_iou", "stability_score"):
            if key in rec:
                ann[key] = float(rec[key])
        if "predicted_iou" in rec:
            ann["score"] = float(rec["predicted_iou"])
        doc["annotations"].append(ann)
    return image_id


def merge_documents(docs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One COCO dict from several (e.g. one per image), renumbering image and annotation ids."""
    out = coco_document(docs[0]["categories"] if docs else None)
    for doc in docs:
        id_map = {}
        for im in doc["images"]:
            new_id = len(out["images"]) + 1
            id_map[im["id"]] = new_id
            out["images"].append(dict(im, id=new_id))
        for ann in doc["annotations"]:
            out["annotations"].append(dict(ann, id=len(out["annotations"]) + 1, image_id=id_map[ann["image_id"]]))
    return out


def write_coco(path: PathLike, doc: Dict[str, Any]) -> Path:
    validate_coco(doc)
    atomic_write_text(path, json.dumps(doc))
    return Path(path)


def validate_coco(doc: Any) -> Dict[str, Any]:
    if not isinstance(doc, dict):
        raise ValueError("a COCO file must hold a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise ValueError(f"a COCO instances file needs a {key!r} list")
    images = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or not {"id", "height", "width"} <= set(im):
            raise ValueError("each COCO image needs 'id', 'height' and 'width'")
        images[im["id"]] = im
    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in images or "segmentation" not in ann:
            raise ValueError(f"COCO annotation {i} needs a known 'image_id' and a 'segmentation'")
    return doc


def read_coco(path: PathLike) -> Dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read COCO file {path}: {exc}") from None
    return validate_coco(doc)


def annotation_mask(doc: Dict[str, Any], ann: Dict[str, Any]) -> np.ndarray:
    """(H, W) bool mask of a COCO annotation (polygons, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    image = next(im for im in doc["images"] if im["id"] == ann["image_id"])
    h, w = int(image["height"]), int(image["width"])
    seg = ann["segmentation"]
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, h, w)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)
    return rle_io.decode(seg)  # uncompressed or compressed RLE
