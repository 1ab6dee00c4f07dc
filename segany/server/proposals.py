"""Everything-mode proposals for the semi-automatic stage, re-using the image's cached embedding."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..predict import ImageEmbedding, Segmenter
from ..predict.amg import AmgSettings, MaskGenerator, SamMaskSource
from ..predict.inputs import load_image
from .jobs import Job


class CachedEmbeddingSource(SamMaskSource):
    """SamMaskSource that takes the whole-image crop's embedding from the server's cache instead of
    running the image encoder again (crops smaller than the image are still embedded). Every step
    first asks the job whether to go on, so a cancelled request stops within one batch."""

    def __init__(self, segmenter: Segmenter, embedding: ImageEmbedding, job: Optional[Job] = None) -> None:
        super().__init__(segmenter.model)
        self.segmenter = segmenter
        self.cached = embedding
        self.job = job or Job(float("inf"))

    def set_crop(self, image: np.ndarray) -> None:
        self.job.check()
        if tuple(image.shape[:2]) == tuple(self.cached.original_size):
            self.embedding = self.cached
        else:
            super().set_crop(image)

    def predict(self, points):
        self.job.check()
        return super().predict(points)

    def predict_above(self, *args, **kwargs):
        self.job.check()
        return super().predict_above(*args, **kwargs)

    def upscale(self, logits):
        self.job.check()
        return super().upscale(logits)


def generate_proposals(
    segmenter: Segmenter, embedding: ImageEmbedding, image_path: Path, options: Dict[str, Any],
    job: Optional[Job] = None,
) -> List[Dict[str, Any]]:
    """SA-1B-style records (COCO RLE segmentation, bbox, area, predicted_iou, stability_score,
    point_coords, crop_box) for one image."""
    settings = AmgSettings(
        points_per_side=int(options["points_per_side"]),
        pred_iou_thresh=float(options["pred_iou_thresh"]),
        stability_score_thresh=float(options["stability_score_thresh"]),
        box_nms_thresh=float(options["box_nms_thresh"]),
        min_mask_region_area=int(options["min_mask_region_area"]),
        output_mode="coco_rle",
    )
    generator = MaskGenerator(CachedEmbeddingSource(segmenter, embedding, job), settings)
    records = generator.generate(load_image(image_path))
    return proposal_records(records)


class FastSamProposals:
    """Proposals from a FastSAM model (one network pass per image) instead of SAM's point grid.
    The model is loaded on first use; records have the same fields as SAM's (predicted_iou = the
    detection confidence, point_coords = the box centre)."""

    def __init__(self, checkpoint: Optional[str], mode: str = "exact") -> None:
        self.checkpoint, self.mode = checkpoint, mode
        self._runner = None
        self._lock = threading.Lock()

    def runner(self):
        with self._lock:
            if self._runner is None:
                from ..io.models import load_model
                from ..modeling.yolov8_seg import YoloV8Seg
                from ..predict.fastsam import FastSam

                model = load_model(self.checkpoint, mode=self.mode)
                if not isinstance(model, YoloV8Seg):
                    raise ValueError(f"proposal model {self.checkpoint} is not a FastSAM model")
                self._runner = FastSam(model)
            return self._runner

    def proposals(self, image_path: Path, max_proposals: int) -> List[Dict[str, Any]]:
        records = self.runner().generate_records(load_image(image_path)).to_annotations("coco_rle")
        return proposal_records(records[:max_proposals])


def proposal_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Generator records in COCO RLE (SAM's or FastSAM's) as the proposals endpoint returns them."""
    out = []
    for i, r in enumerate(records):
        seg = r["segmentation"]
        counts = seg["counts"].decode("ascii") if isinstance(seg["counts"], bytes) else seg["counts"]
        out.append(
            {
                "index": i,
                "segmentation": {"size": [int(v) for v in seg["size"]], "counts": counts},
                "area": int(r["area"]),
                "bbox": [float(v) for v in r["bbox"]],
                "predicted_iou": float(r["predicted_iou"]),
                "stability_score": float(r["stability_score"]),
                "point_coords": [[float(x), float(y)] for x, y in r["point_coords"]],
                "crop_box": [float(v) for v in r["crop_box"]],
            }
        )
    return out
