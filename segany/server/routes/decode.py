"""Decoding prompts into masks, and everything-mode proposals, on an image's cached embedding."""
from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np
from fastapi import APIRouter, Request

from ...predict import Prompt
from ...predict.inputs import check_boxes, check_points
from .. import masks
from ..deps import Ctx
from ..logits import mask_from_b64
from ..schemas import DecodeIn, ProposalsIn

router = APIRouter(tags=["decode"])


def _candidate(index: int, score: float, mask: np.ndarray, size) -> Dict[str, Any]:
    encoded = masks.encode(mask)
    return {
        "index": index,
        "score": float(score),
        "segmentation": {"size": [size[0], size[1]], "counts": encoded["counts"]},
        "area": encoded["area"],
        "bbox": encoded["bbox"],
    }


def _decode_levels(ctx: Any, slot: Any, image: Dict[str, Any], body: DecodeIn, t0: float) -> Dict[str, Any]:
    """Semantic-SAM: one foreground click -> one candidate per granularity level (level order 1..6)."""
    from ...predict.semantic_sam_predictor import SemanticSamPredictor

    size = (image["height"], image["width"])
    if body.box is not None or body.mask_input is not None or body.mask_input_b64 is not None:
        raise ValueError(f"{slot.name} (Semantic-SAM) takes one click: no box and no mask input")
    if len(body.points) != 1 or len(body.labels) not in (0, 1):
        raise ValueError(f"{slot.name} (Semantic-SAM) takes exactly one click, got {len(body.points)} points")
    check_points(np.array(body.points, dtype=np.float64).reshape(-1, 2), body.labels or [1], size)
    t1 = time.perf_counter()
    predictor = SemanticSamPredictor(slot.model)
    predictor._image = slot.images.get(image["sha256"], ctx.image_path(image))  # features computed once per image
    t2 = time.perf_counter()
    level_masks, scores, _ = predictor.predict(point_coords=body.points, point_labels=body.labels or [1])
    candidates = []
    for i, level in enumerate(predictor.last_levels):
        candidates.append({**_candidate(i, scores[i], level_masks[i], size), "level": level})
    best = body.granularity - 1 if body.granularity is not None else int(np.argmax(scores))
    t3 = time.perf_counter()
    return {
        "candidates": candidates,
        "best": best,
        "token": None,
        "model": slot.name,
        "levels": predictor.last_levels,
        "timing_ms": {"wait_embedding": round((t2 - t1) * 1000, 2), "decode": round((t3 - t2) * 1000, 2),
                      "total": round((t3 - t0) * 1000, 2)},
    }


@router.post("/api/images/{image_id}/decode", summary="Masks for points / box / previous logits")
def decode(image_id: int, body: DecodeIn, ctx: Ctx) -> Dict[str, Any]:
    t0 = time.perf_counter()
    image = ctx.storage.image(image_id)
    slot = ctx.slot(body.model)
    if slot.family == "semantic-sam":
        return _decode_levels(ctx, slot, image, body, t0)
    if body.granularity is not None:
        raise ValueError(f"granularity is for multi-granularity models (Semantic-SAM); {slot.name} is not one")
    size = (image["height"], image["width"])
    coords = labels = None
    if body.points or body.labels:
        coords, labels = check_points(np.array(body.points, dtype=np.float64).reshape(-1, 2), body.labels, size)
    box = check_boxes(body.box, size) if body.box is not None else None
    mask = None
    if body.mask_input is not None and body.mask_input_b64 is not None:
        raise ValueError("give mask_input or mask_input_b64, not both")
    if body.mask_input is not None:
        mask = slot.logits_cache.get(body.mask_input.token, image_id, body.mask_input.index)
    elif body.mask_input_b64 is not None:
        mask = mask_from_b64(body.mask_input_b64, slot.segmenter.low_res_size)
    if coords is None and box is None and mask is None:
        raise ValueError("give at least one point, a box or a mask_input")
    t1 = time.perf_counter()
    embedding = slot.embeddings.get(image["sha256"], ctx.image_path(image), ctx.config.decode_wait_s)
    t2 = time.perf_counter()
    pred = slot.segmenter.segment(
        embedding, Prompt(points=coords, labels=labels, box=box, mask=mask), multimask_output=body.multimask
    )
    token = slot.logits_cache.put(image_id, pred.low_res_logits.astype(np.float32))
    candidates = [_candidate(i, pred.scores[i], pred.masks[i], size) for i in range(pred.masks.shape[0])]
    t3 = time.perf_counter()
    return {
        "candidates": candidates,
        "best": int(np.argmax(pred.scores)),
        "token": token,
        "model": slot.name,
        "timing_ms": {
            "wait_embedding": round((t2 - t1) * 1000, 2),
            "decode": round((t3 - t2) * 1000, 2),
            "total": round((t3 - t0) * 1000, 2),
        },
    }


@router.post("/api/images/{image_id}/proposals", summary="Everything-mode proposals for an image "
             "(a cancellable job: closing the connection stops it)")
async def proposals(image_id: int, body: ProposalsIn, ctx: Ctx, request: Request) -> Dict[str, Any]:
    from ..proposals import generate_proposals

    image = ctx.storage.image(image_id)

    def work(job):
        if ctx.fastsam_proposals is not None:  # one FastSAM pass instead of SAM's point grid
            t0 = time.perf_counter()
            records = ctx.fastsam_proposals.proposals(ctx.image_path(image), body.max_proposals)
            job.check()
        else:
            embedding = ctx.embeddings.get(image["sha256"], ctx.image_path(image), ctx.config.decode_wait_s)
            t0 = time.perf_counter()
            records = generate_proposals(ctx.segmenter, embedding, ctx.image_path(image), body.model_dump(), job)
        records = sorted(records, key=lambda r: -r["predicted_iou"])[: body.max_proposals]
        return {"proposals": records, "seconds": round(time.perf_counter() - t0, 3)}

    return await ctx.jobs.run(request, work)
