"""COCO instances JSON (images, annotations, categories), written atomically, read with checks.

    doc = coco_document()                                   # empty dataset, one category "object"
    add_image(doc, "a.jpg", height, width, records)         # generator records, any output mode
    write_coco("instances.json", doc)
    doc = read_coco("instances.json"); masks = annotation_mask(doc, doc["annotations"][0])

Records may carry their own "id", "category_id" and "score" (the annotation server's do); generator
records get running ids, the image's category, and "score" from "predicted_iou".

Segmentations are compressed RLE by default; polygons=True writes polygons (simplified by
`tolerance` pixels) for masks without holes, since COCO polygons cannot express holes, and RLE otherwise.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import polygons as poly_io
from . import rle as rle_io
from .jsonfile import read_json, write_json
from .sa1b import to_coco_rle

PathLike = Union[str, os.PathLike]
DEFAULT_CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object"}]


def coco_document(
    categories: Optional[List[Dict[str, Any]]] = None, description: str = "segany", **info: Any
) -> Dict[str, Any]:
    """An empty dataset; `info` adds fields to its "info" (e.g. date_created, version)."""
    return {
        "info": {"description": description, **info},
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
    image_id: Optional[int] = None,
) -> int:
    """Append an image and its mask records; returns the image id (the next free one unless given)."""
    if image_id is None:
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
            "id": int(rec.get("id", next_id + i)),
            "image_id": image_id,
            "category_id": int(rec.get("category_id", category_id)),
            "segmentation": segmentation,
            "area": int(rec["area"] if "area" in rec else rle_io.area(rle)),
            "bbox": [float(v) for v in (rec["bbox"] if "bbox" in rec else rle_io.to_bbox(rle))],
            "iscrowd": 0,
        }
        for key in ("predicted_iou", "stability_score"):
            if key in rec:
                ann[key] = float(rec[key])
        score = rec.get("score", rec.get("predicted_iou"))
        if score is not None:
            ann["score"] = float(score)
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
    return write_json(path, validate_coco(doc))


def validate_coco(doc: Any, image_keys: Sequence[str] = ("id", "height", "width")) -> Dict[str, Any]:
    """Raise ValueError unless `doc` is a COCO instances dict whose images have `image_keys`; returns it."""
    if not isinstance(doc, dict):
        raise ValueError("a COCO file must hold a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise ValueError(f"a COCO instances file needs a {key!r} list")
    images = {}
    for im in doc["images"]:
        if not isinstance(im, dict) or not set(image_keys) <= set(im):
            raise ValueError("each COCO image needs " + ", ".join(repr(k) for k in image_keys))
        if not isinstance(im["id"], (int, str)):
            raise ValueError(f"COCO image id {str(im['id'])[:50]} is not a number or a string")
        images[im["id"]] = im
    for i, ann in enumerate(doc["annotations"]):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(image_id, (int, str)) or image_id not in images or "segmentation" not in ann:
            raise ValueError(f"COCO annotation {i} needs a known 'image_id' and a 'segmentation'")
    return doc


def read_coco(path: PathLike) -> Dict[str, Any]:
    """Load and check a COCO instances file (ValueError if it is damaged or not COCO)."""
    return validate_coco(read_json(path, "COCO"))


def annotation_mask(doc: Dict[str, Any], ann: Dict[str, Any]) -> np.ndarray:
    """(H, W) bool mask of a COCO annotation (polygons, uncompressed or compressed RLE)."""
    image = next(im for im in doc["images"] if im["id"] == ann["image_id"])
    seg = ann["segmentation"]
    if isinstance(seg, list):
        seg = polygons_rle(seg, int(image["height"]), int(image["width"]))
    return rle_io.decode(seg)  # uncompressed or compressed RLE


MAX_POLYGONS = 10_000  # polygons in one annotation
MAX_POLYGON_VALUES = 200_000  # coordinates (x and y) in one annotation
# Vertices may lie outside the image (annotators overshoot its border) but only within this many image
# sizes of it; the outline's length (pixels, as pycocotools steps along it) is bounded in units of H + W.
POLYGON_MARGIN = 1.0
MAX_OUTLINE = 500


def check_polygons(polygons: Any, height: int, width: int) -> List[List[float]]:
    """COCO polygons as lists of floats, checked before pycocotools rasterises them.

    pycocotools allocates memory in proportion to the outline's length and does not check its inputs:
    a coordinate of 1e9 makes it allocate gigabytes or crash the process. So coordinates must be finite
    and near the image, and counts and the total outline bounded; anything else is a ValueError.
    """
    if not isinstance(polygons, (list, tuple)) or not polygons:
        raise ValueError("polygon segmentation must be a non-empty list of polygons")
    if len(polygons) > MAX_POLYGONS:
        raise ValueError(f"{len(polygons)} polygons in one annotation: more than the limit of {MAX_POLYGONS}")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is empty")
    lo_x, hi_x = -POLYGON_MARGIN * width, (1 + POLYGON_MARGIN) * width
    lo_y, hi_y = -POLYGON_MARGIN * height, (1 + POLYGON_MARGIN) * height
    out, values, outline = [], 0, 0.0
    for polygon in polygons:
        if not isinstance(polygon, (list, tuple)) or len(polygon) < 2 or len(polygon) % 2:
            raise ValueError("each polygon must be a list [x0, y0, x1, y1, ...] of x, y pairs")
        values += len(polygon)
        if values > MAX_POLYGON_VALUES:
            raise ValueError(f"more than {MAX_POLYGON_VALUES} polygon coordinates in one annotation")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
            raise ValueError("polygon coordinates must be numbers")
        try:
            xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        except OverflowError:
            raise ValueError("polygon coordinates must be finite") from None
        if not np.isfinite(xy).all():
            raise ValueError("polygon coordinates must be finite")
        if xy[:, 0].min() < lo_x or xy[:, 0].max() > hi_x or xy[:, 1].min() < lo_y or xy[:, 1].max() > hi_y:
            raise ValueError(
                f"polygon coordinates reach ({xy[:, 0].min():g}..{xy[:, 0].max():g}, {xy[:, 1].min():g}.."
                f"{xy[:, 1].max():g}), too far outside the {width}x{height} image"
            )
        steps = np.abs(np.diff(np.vstack([xy, xy[:1]]), axis=0)).max(axis=1)
        outline += float(steps.sum())
        out.append([float(v) for v in polygon])
    if outline > MAX_OUTLINE * (height + width):
        raise ValueError(f"the polygons' outline ({outline:.0f} px) is too long for a {width}x{height} image")
    return out


def polygons_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> Dict[str, Any]:
    """Compressed RLE (str counts) of the union of COCO polygons [x0, y0, x1, y1, ...], rasterised as
    pycocotools does (so areas match COCO's own tools). Checked first (see check_polygons)."""
    from pycocotools import mask as mask_utils

    checked = check_polygons(polygons, height, width)
    rle = mask_utils.merge(mask_utils.frPyObjects(checked, height, width))
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
