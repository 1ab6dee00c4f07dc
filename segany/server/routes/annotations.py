"""Annotations: list, save (committed on return), change, delete."""
from __future__ import annotations

import json
from typing import Any, Dict

from fastapi import APIRouter

from .. import masks
from ..deps import Ctx, User
from ..schemas import AnnotationIn, AnnotationPatch, AnnotationsIn

router = APIRouter(tags=["annotations"])


def _checked_item(image: Dict[str, Any], item: AnnotationIn) -> Dict[str, Any]:
    encoded = masks.from_client(item.segmentation, image["height"], image["width"])
    meta = item.meta or {}
    try:
        text = json.dumps(meta, allow_nan=False)
    except ValueError:
        raise ValueError("annotation meta holds NaN or infinite numbers") from None
    if len(text) > 20000:
        raise ValueError("annotation meta is too large")
    return {
        "label_id": item.label_id,
        "rle_counts": encoded["counts"],
        "area": encoded["area"],
        "bbox": encoded["bbox"],
        "score": item.score,
        "source": item.source,
        "meta": meta,
    }


@router.get("/api/images/{image_id}/annotations", summary="An image's annotations")
def list_annotations(image_id: int, ctx: Ctx) -> Dict[str, Any]:
    image = ctx.storage.image(image_id)
    return {"annotations": ctx.storage.annotations(image_id), "revision": ctx.storage.revision(image["project_id"])}


@router.post("/api/images/{image_id}/annotations", status_code=201, summary="Save annotations (committed on return)")
def create_annotations(image_id: int, body: AnnotationsIn, ctx: Ctx, user: User) -> Dict[str, Any]:
    image = ctx.storage.image(image_id)
    items = [_checked_item(image, a) for a in body.annotations]
    return {"annotations": ctx.storage.add_annotations(image_id, items, user)}


@router.patch("/api/annotations/{annotation_id}", summary="Change an annotation's label or mask")
def update_annotation(annotation_id: int, body: AnnotationPatch, ctx: Ctx, user: User) -> Dict[str, Any]:
    current = ctx.storage.annotation(annotation_id)
    changes: Dict[str, Any] = {}
    if body.segmentation is not None:
        image = ctx.storage.image(current["image_id"])
        encoded = masks.from_client(body.segmentation, image["height"], image["width"])
        changes.update(rle_counts=encoded["counts"], area=encoded["area"], bbox=encoded["bbox"])
    if body.clear_label:
        changes["label_id"] = None
    elif body.label_id is not None:
        changes["label_id"] = body.label_id
    return ctx.storage.update_annotation(annotation_id, changes, user, body.version)


@router.delete("/api/annotations/{annotation_id}", summary="Delete an annotation")
def delete_annotation(annotation_id: int, ctx: Ctx) -> Dict[str, Any]:
    return {"deleted": ctx.storage.delete_annotation(annotation_id)["id"]}
