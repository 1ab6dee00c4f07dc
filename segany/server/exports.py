"""Project data out and in: COCO instances JSON, SA-1B per-image JSON, COCO import."""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional

from ..io import coco as coco_io
from ..io import sa1b as sa1b_io
from . import masks
from .jobs import Job
from .storage import Storage

MAX_IMPORT_ANNOTATIONS = 500_000  # in one COCO file

UNLABELED = "unlabeled"


def coco_instances(
    project: Dict[str, Any], images: List[Dict[str, Any]], labels: List[Dict[str, Any]], annotations: List[Dict[str, Any]]
) -> Dict[str, Any]:
    """COCO instances JSON (built and checked by segany.io.coco); unlabeled annotations go to an extra
    'unlabeled' category. Image and annotation ids are the project's."""
    categories = [{"id": label["id"], "name": label["name"], "supercategory": ""} for label in labels]
    unlabeled_id = None
    if any(a["label_id"] is None for a in annotations):
        unlabeled_id = max([c["id"] for c in categories], default=0) + 1
        categories.append({"id": unlabeled_id, "name": UNLABELED, "supercategory": ""})
    doc = coco_io.coco_document(
        categories,
        description=f"segany project {project['name']}",
        date_created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        version="1",
    )
    per_image: Dict[int, List[Dict[str, Any]]] = {}
    for a in annotations:
        per_image.setdefault(a["image_id"], []).append(
            {
                "id": a["id"],
                "category_id": a["label_id"] if a["label_id"] is not None else unlabeled_id,
                "segmentation": a["segmentation"],
                "area": a["area"],
                "bbox": a["bbox"],
                "score": a["score"],
            }
        )
    for image in images:
        coco_io.add_image(doc, image["file_name"], image["height"], image["width"], per_image.get(image["id"], []),
                          image_id=image["id"])
    doc["annotations"].sort(key=lambda a: a["id"])  # project order, as stored
    return coco_io.validate_coco(doc)


def _sa1b_extras(meta: Dict[str, Any]) -> Dict[str, Any]:
    """The SA-1B fields among an annotation's meta (client data: a malformed one is left out, not exported)."""
    out = {}
    for key, normalise in sa1b_io.OPTIONAL_FIELDS.items():
        if meta.get(key) is not None:
            try:
                out[key] = normalise(meta[key])
            except (TypeError, ValueError):
                pass
    return out


def sa1b_image(image: Dict[str, Any], annotations: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One image's annotations in the SA-1B per-image layout (built by segany.io.sa1b; fields without a
    value are omitted: manual masks have no stability score or crop box)."""
    records = []
    for a in annotations:
        record = {**_sa1b_extras(a.get("meta") or {}), "id": a["id"], "segmentation": a["segmentation"],
                  "bbox": a["bbox"], "area": a["area"]}
        record["predicted_iou"] = a["score"]  # the annotation's own score, never the meta's
        records.append(record)
    info = {"image_id": image["id"], "width": image["width"], "height": image["height"], "file_name": image["file_name"]}
    return sa1b_io.validate_sa1b(sa1b_io.sa1b_document(records, info))


def _finite_or_none(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def import_coco(storage: Storage, project_id: int, data: Any, user: str, job: Optional[Job] = None) -> Dict[str, Any]:
    """Add a COCO file's annotations to the project's images of the same file_name (all or nothing per image).

    Categories become labels (by name). Crowd annotations are imported too (as masks). Every mask is
    checked (sizes, coordinates, counts) before pycocotools sees it; `job` can stop the checking phase,
    before anything is written.
    """
    if isinstance(data, dict) and not data.get("categories"):
        data = dict(data, categories=[])  # categories are optional here: without them, masks come in unlabeled
    # The project's image gives the size, so a COCO image needs only an id and a file_name.
    coco_io.validate_coco(data, image_keys=("id", "file_name"))
    if len(data["annotations"]) > MAX_IMPORT_ANNOTATIONS:
        raise ValueError(f"{len(data['annotations'])} annotations: more than the limit of {MAX_IMPORT_ANNOTATIONS}")
    categories = {}
    for c in data["categories"]:
        if isinstance(c, dict) and isinstance(c.get("id"), (int, str)) and "name" in c:
            categories[c["id"]] = str(c["name"])
    coco_images = {i["id"]: i for i in data["images"]}
    # Check everything first, write afterwards: a bad file writes nothing.
    per_image: Dict[int, List[Dict[str, Any]]] = {}
    label_names: Dict[int, str] = {}
    missing = set()
    for n, a in enumerate(data["annotations"]):
        if job is not None and n % 64 == 0:
            job.check()
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
        if not isinstance(category, (int, str)):
            category = None
        if category is not None and category in categories:
            label_names[category] = categories[category]
        per_image.setdefault(image["id"], []).append(
            {
                "category": category if category in categories else None,
                "rle_counts": encoded["counts"],
                "area": encoded["area"],
                "bbox": encoded["bbox"],
                "score": _finite_or_none(a.get("score")),
                "source": "import",
                "meta": {"coco_id": a.get("id") if isinstance(a.get("id"), (int, str)) else None},
            }
        )
    label_ids = {cat: storage.add_label(project_id, name)["id"] for cat, name in label_names.items()}
    imported = 0
    for image_id, items in per_image.items():
        for item in items:
            item["label_id"] = label_ids.get(item.pop("category"))
        imported += len(storage.add_annotations(image_id, items, user))
    return {"imported": imported, "images": len(per_image), "missing_images": sorted(missing)}
