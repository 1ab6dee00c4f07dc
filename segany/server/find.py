"""Text search among an image's everything-mode proposals: POST /api/images/{image_id}/find.

    {"text": "a dog", "top_k": 5, "negative": ["background"]}
 -> {"matches": [<proposal record> + "score"], "seconds": 0.8}

The candidates are the image's proposals with the proposals endpoint's default settings (from the
cached embedding, kept for the last few images; FastSAM's instances when the server runs with
--proposal-model fastsam-...), the records exactly as that endpoint returns them;
each match adds its text score (see segany.predict.text_select). Without a CLIP model (segany serve
--clip PATH) the endpoint answers 409 with the reason.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from ..io import rle as rle_io
from .schemas import ERROR_RESPONSES, ProposalsIn
from ..predict.text_select import ClipScorer, MAX_PHRASE_CHARS, check_phrases, score_masks

NO_CLIP = "no CLIP model is configured: start the server with segany serve --clip PATH_OR_NAME (e.g. clip_vit_b32)"


class FindIn(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_PHRASE_CHARS)
    top_k: int = Field(default=5, ge=1, le=50)
    negative: Optional[List[str]] = Field(default=None, max_length=20)


class ProposalCache:
    """The last few images' proposal records and their decoded masks."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.items: "OrderedDict[str, tuple]" = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str, make: Callable[[], List[Dict[str, Any]]]) -> tuple:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        records = make()
        masks = np.stack([rle_io.decode(r["segmentation"]) for r in records]) if records else None
        with self.lock:
            self.items[key] = (records, masks)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return records, masks


def add_find_route(app: FastAPI, clip: Any, storage: Any, embeddings: Any, segmenter: Any,
                   image_path: Callable, wait_s: float) -> None:
    """Register the endpoint on `app`; `clip` is a CLIP model or None."""
    from .proposals import generate_proposals

    cache = ProposalCache()
    scorer = ClipScorer(clip) if clip is not None else None
    # The proposals endpoint's defaults (ProposalsIn in schemas.py), so the matches are proposals the page
    # knows; app.state.find_proposal_settings may change them (tests with random weights do).
    app.state.find_proposal_settings = dict(
        points_per_side=16, pred_iou_thresh=0.88, stability_score_thresh=0.95, box_nms_thresh=0.7, min_mask_region_area=0
    )
    scorer_lock = threading.Lock()

    @app.post("/api/images/{image_id}/find", summary="The image's proposals that best match a text",
              responses=ERROR_RESPONSES)
    def find(image_id: int, body: FindIn) -> Dict[str, Any]:
        if scorer is None:
            raise HTTPException(status_code=409, detail=NO_CLIP)
        check_phrases(body.text)
        negative = check_phrases(body.negative, "negative phrase") if body.negative else None
        image = storage.image(image_id)
        t0 = time.perf_counter()
        path = image_path(image)

        settings = dict(app.state.find_proposal_settings)
        # A server started with --proposal-model proposes with FastSAM; its proposals are then the candidates.
        fastsam = getattr(getattr(app.state, "ctx", None), "fastsam_proposals", None)

        def make() -> List[Dict[str, Any]]:
            if fastsam is not None:
                return fastsam.proposals(path, int(settings.get("max_proposals", ProposalsIn.model_fields["max_proposals"].default)))
            embedding = embeddings.get(image["sha256"], path, wait_s)
            return generate_proposals(segmenter, embedding, path, settings)

        key = f"{image['sha256']}:{'fastsam' if fastsam is not None else ''}:{sorted(settings.items())}"
        records, masks = cache.get(key, make)
        if not records:
            return {"matches": [], "seconds": round(time.perf_counter() - t0, 3)}
        with scorer_lock:  # one CLIP pass at a time: it uses every core already
            scores, _ = score_masks(path, masks, body.text, scorer, negative)
        order = np.argsort(-scores[0], kind="stable")[: body.top_k]
        matches = [dict(records[i], score=float(scores[0, i])) for i in order if np.isfinite(scores[0, i])]
        return {"matches": matches, "seconds": round(time.perf_counter() - t0, 3)}


def load_find_clip(clip: Optional[str], mode: str) -> Any:
    if not clip:
        return None
    from ..io.clip import load_clip

    return load_clip(clip, mode=mode)
