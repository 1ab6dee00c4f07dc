"""Project data out and in: COCO instances JSON, SA-1B per-image JSON, COCO import."""
from __future__ import annotations

import time
from typing import Any, Dict, List

from . import masks
from .storage import Storage

UNLABELED = "unlabeled"


def _rle(annotation: Dict[str, Any]) -> Dict[str, Any]:
    seg = annotation["segmentation"]
    return {"size": list(seg["size"]), "counts": seg["counts"]}


def coco_instances(
    project: Dict[str, Any], images: List[Dict[str, Any]], labels: List[Dict[str, Any]], annotations: List[Dict[str, Any]]
) -> Dict[str, Any]:
    """COCO instances JSON; unlabeled annotations go to an extra 'unlabeled' category."""
    categories = [{"id": label["id"], "name": label["name"], "supercategory": ""} for label in labels]
    unlabeled_id = None
    if any(a["label_id"] is None for a in annotations):
        unlabeled_id = max([c["id"] for c in categories], default=0) + 1
        categories.append({"id": unlabeled_id, "name": UNLABELED, "supercategory": ""})
    out_annotations = []
    for a in annotations:
        item = {
            "id": a["id"],
            "image_id": a["image_id"],
            "category_id": a["label_id"] if a["label_id"] is not None else unlabeled_id,
            "segmentation": _rle(a),
            "area": a["area"],
            "bbox": a["bbox"],
            "iscrowd": 0,
        }
        if a["score"] is not None:
            item["score"] = a["score"]
        out_annotations.append(item)
    return {
        "info": {
            "description": f"segany project {project['name']}",
            "date_created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "version": "1",
        },
        "licenses": [],
        "images": [
            {"id": i["id"], "file_name": i["file_name"], "width": i["width"], "height": i["height"]} for i in images
        ],
        "annotations": out_annotations,
        "categories": categories,
    }


def sa1b_image(image: Dict[str, Any], annotations: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One image's annotations in the SA-1B per-image layout (fields without a value are omitted:
    manual masks have no stability score or crop box)."""
    out = []
    for a in annotations:
        meta = a.get("meta") or {}
        item: Dict[str, Any] = {
            "id": a["id"],
            "segmentation": _rle(a),
            "bbox": a["bbox"],
            "area": a["area"],
        }
        if a["score"] is not None:
            item["predicted_iou"] = a["score"]
        for key in ("point_coords", "stability_score", "crop_box"):
            if key in meta:
                item[key] = meta[key]
        out.append(item)
    return {
        "image": {"image_id": image["id"], "width": image["width"], "height": image["height"], "file_name": image["file_name"]},
        "annotations": out,
    }


def import_coco(storage: Storage, project_id: int, data: Any, user: str) -> Dict[str, Any]:
    """Add a COCO file's annotations to the project's images of the same file_name (all or nothing per image).

    Categories become labels (by name). Crowd annotations are imported too (as masks).
    """
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError("not a COCO instances file: it needs 'images' and 'annotations' lists")
    categories = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and "id" in c and "name" in c:
            categories[c["id"]] = str(c["name"])
    coco_images = {}
    for i in data["images"]:
        if not isinstance(i, dict) or "id" not in i or "file_name" not in i:
            raise ValueError("every COCO image needs an id and a file_name")
        coco_images[i["id"]] = i
    # Check everything first, write afterwards: a bad file writes nothing.
    per_image: Dict[int, List[Dict[str, Any]]] = {}
    label_names: Dict[int, str] = {}
    missing = set()
    for a in data["annotations"]:
        if not isinstance(a, dict) or a.get("image_id") not in coco_images or "segmentation" not in a:
            raise ValueError("every COCO annotation needs a known image_id and a segmentation")
        coco_image = coco_images[a["image_id"]]
        name = str(coco_image["file_name"]).replace("\\", "/").split("/")[-1]
        image = storage.image_by_file_name(project_id, str(coco_image["file_name"])) or storage.image_by_file_name(
            project_id, name
        )
        if image is None:
            missing.add(str(coco_image["file_name"]))
            continue
        try:
            encoded = masks.from_coco(a["segmentation"], image["height"], image["width"])
        except ValueError as exc:
            raise ValueError(f"annotation {a.get('id')}: {exc}") from None
        category = a.get("category_id")
        if category is not None and category in categories:
            label_names[category] = categories[category]
        per_image.setdefault(image["id"], []).append(
            {
                "category": category if category in categories else None,
                "rle_counts": encoded["counts"],
                "area": encoded["area"],
                "bbox": encoded["bbox"],
                "score": float(a["score"]) if isinstance(a.get("score"), (int, float)) else None,
                "source": "import",
                "meta": {"coco_id": a.get("id")},
            }
        )
    label_ids = {cat: storage.add_label(project_id, name)["id"] for cat, name in label_names.items()}
    imported = 0
    for image_id, items in per_image.items():
        for item in items:
            item["label_id"] = label_ids.get(item.pop("category"))
        imported += len(storage.add_annotations(image_id, items, user))
    return {"imported": imported, "images": len(per_image), "missing_images": sorted(missing)}
