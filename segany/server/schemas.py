"""Request and error bodies of the server's API (pydantic models, shown in the OpenAPI schema)."""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple

from pydantic import BaseModel, Field


class Error(BaseModel):
    """Every error answer: one line saying what was wrong."""

    detail: str


class ProjectIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)


class LabelIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    color: Optional[str] = Field(default=None, pattern=r"^#[0-9a-fA-F]{6}$")


class FolderImportIn(BaseModel):
    folder: str = Field(max_length=4096)
    recursive: bool = False


class MaskRef(BaseModel):
    token: str = Field(max_length=64)  # from an earlier decode's answer
    index: int = Field(ge=0, le=3)  # which of its candidates


class DecodeIn(BaseModel):
    points: List[Tuple[float, float]] = Field(default_factory=list, max_length=256)  # x, y in image pixels
    labels: List[int] = Field(default_factory=list, max_length=256)  # 1 positive, 0 negative
    box: Optional[Tuple[float, float, float, float]] = None  # x0, y0, x1, y1
    mask_input: Optional[MaskRef] = None  # previous low-res logits, by reference
    mask_input_b64: Optional[str] = Field(default=None, max_length=400_000)  # base64 float32 LE (256, 256)
    multimask: bool = True  # 3 candidates, or 1
    model: Optional[str] = Field(default=None, max_length=1000)  # one of /api/info's models; default: the first
    # Multi-granularity models (Semantic-SAM) only: the level 1 (coarsest) .. 6 (finest) the answer's `best` is.
    granularity: Optional[int] = Field(default=None, ge=1, le=6)


class AnnotationIn(BaseModel):
    segmentation: Dict[str, Any]  # COCO RLE {"size": [h, w], "counts": str | [int]}
    label_id: Optional[int] = None
    score: Optional[float] = Field(default=None, allow_inf_nan=False)
    source: Literal["click", "box", "brush", "proposal", "import", "api"] = "api"
    meta: Dict[str, Any] = Field(default_factory=dict)  # e.g. point_coords, stability_score, crop_box


class AnnotationsIn(BaseModel):
    annotations: List[AnnotationIn] = Field(min_length=1, max_length=2000)


class AnnotationPatch(BaseModel):
    segmentation: Optional[Dict[str, Any]] = None
    label_id: Optional[int] = None
    clear_label: bool = False  # set the label to none
    version: Optional[int] = None  # the version the client edited; 409 when it changed meanwhile


class ProposalsIn(BaseModel):
    points_per_side: int = Field(default=16, ge=1, le=64)
    pred_iou_thresh: float = Field(default=0.88, ge=0, le=1)
    stability_score_thresh: float = Field(default=0.95, ge=0, le=1)
    box_nms_thresh: float = Field(default=0.7, gt=0, le=1)
    min_mask_region_area: int = Field(default=0, ge=0)
    max_proposals: int = Field(default=200, ge=1, le=2000)


# Every error the API answers, as the OpenAPI schema describes it: {"detail": "one line"}.
ERROR_RESPONSES = {
    status: {"model": Error, "description": text}
    for status, text in {
        400: "Malformed request", 401: "Missing or wrong access token", 403: "Cross-origin or outside the allowed folders",
        404: "No such project, image, label or annotation", 409: "Conflict with the stored state",
        413: "Body, file or image too large", 415: "Not a supported image", 421: "Unknown Host",
        422: "Invalid request (the reason in detail)", 503: "Busy: try again (Retry-After)",
    }.items()
}
