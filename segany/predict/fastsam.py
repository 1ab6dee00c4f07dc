"""FastSAM everything mode: one network pass gives every instance mask of the image.

    FastSam(model).everything(image) -> FastSamResult(boxes, scores, masks, ...)

The steps and defaults (imgsz 1024, conf 0.4, iou 0.9, max_det 300, masks at the image's resolution)
are those of ultralytics' FastSAM predictor (see yolo_postprocess). `mode` follows the model's
(`load_model(..., mode=...)`): exact = float32 definition, fast = segany.engine.fastsam.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import numpy as np
import torch

from ..engine.fastsam import FastSamEngine
from ..io import rle as rle_io
from ..modeling.yolov8_seg import YoloV8Seg
from . import yolo_postprocess as post
from .inputs import load_image


@dataclass
class FastSamSettings:
    imgsz: int = 1024
    conf: float = 0.4
    iou: float = 0.9
    max_det: int = 300
    border_snap: float = 20.0  # FastSAM: box sides this close to the image border are moved onto it
    whole_image_iou: float = 0.9  # FastSAM: boxes this close to the whole image become the whole image

    def validate(self) -> "FastSamSettings":
        self.imgsz = post.check_imgsz(self.imgsz)
        for name in ("conf", "iou"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.max_det, bool) or not isinstance(self.max_det, int) or self.max_det < 1:
            raise ValueError(f"max_det must be a positive integer, got {self.max_det!r}")
        return self


@dataclass
class FastSamResult:
    """Everything-mode output for one image, ordered by descending score (NMS order)."""

    image_hw: Tuple[int, int]
    boxes: np.ndarray  # (n, 4) float32 x1 y1 x2 y2, image pixels, after FastSAM's border snapping
    scores: np.ndarray  # (n,) float32 confidence
    masks: np.ndarray  # (n, h, w) bool
    boxes_before_snap: np.ndarray  # (n, 4): the boxes the masks were cropped to
    anchors: np.ndarray  # (n,) index of each detection's anchor in the raw prediction
    stability: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, index: Any) -> "FastSamResult":
        index = np.asarray(index, dtype=np.int64)
        return FastSamResult(
            self.image_hw, self.boxes[index], self.scores[index], self.masks[index], self.boxes_before_snap[index],
            self.anchors[index], self.stability[index] if len(self.stability) else self.stability,
        )


@dataclass
class RawOutput:
    """The network's view of one image: letterboxed input and raw outputs (for tests and inspection)."""

    input: torch.Tensor  # (1, 3, H, W)
    letterbox: post.Letterbox
    prediction: torch.Tensor  # (1, 4 + nc + nm, N)
    protos: torch.Tensor  # (1, nm, H/4, W/4)


class FastSam:
    """Runs a YOLOv8-seg / FastSAM network in everything mode."""

    def __init__(self, model: YoloV8Seg, settings: Optional[FastSamSettings] = None, mode: Optional[str] = None,
                 bfloat16: bool = True) -> None:
        if not isinstance(model, YoloV8Seg):
            raise ValueError(f"FastSam needs a FastSAM / YOLOv8-seg model, got {type(model).__name__}")
        self.model = model
        self.settings = (settings or FastSamSettings()).validate()
        self.engine = FastSamEngine(model, mode or getattr(model, "mode", "exact"), bfloat16=bfloat16)

    @property
    def mode(self) -> str:
        return self.engine.mode

    def raw(self, image: Any) -> RawOutput:
        image = load_image(image)
        boxed, lb = post.letterbox(image, self.settings.imgsz)
        x = post.to_input(boxed).to(self.engine.device)
        pred, protos = self.engine(x)
        return RawOutput(x, lb, pred.cpu(), protos.cpu())

    def run_network(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The network on an already letterboxed (1, 3, H, W) input in [0, 1]."""
        pred, protos = self.engine(x.to(self.engine.device))
        return pred.cpu(), protos.cpu()

    @torch.inference_mode()
    def everything(self, image: Any, stability_offset: float = 0.0) -> FastSamResult:
        """Every instance of an HxWx3 uint8 RGB image (or a path / PIL image)."""
        raw = self.raw(image)
        return self.postprocess(raw.prediction[0], raw.protos[0], raw.letterbox, stability_offset)

    @torch.inference_mode()
    def postprocess(self, prediction: torch.Tensor, protos: torch.Tensor, lb: post.Letterbox,
                    stability_offset: float = 0.0) -> FastSamResult:
        s = self.settings
        nc = self.model.config.num_classes
        det = post.detect(prediction.float(), s.conf, s.iou, s.max_det, nc)
        boxes = post.boxes_to_image(det.boxes, lb)
        if self.mode == "fast":  # only the pixels inside each box are computed (same masks up to rounding)
            masks, stability, keep = post.assemble_masks_in_boxes(protos, det.coefs, boxes, lb.image_hw, stability_offset)
        else:
            masks, stability = post.assemble_masks(protos, det.coefs, boxes, lb.image_hw, stability_offset)
            keep = masks.flatten(1).any(1) if len(masks) else torch.zeros(0, dtype=torch.bool)
        if not bool(keep.all()):  # results with an empty mask are dropped (copying the stack only then)
            boxes, masks, det.scores, det.anchors = boxes[keep], masks[keep], det.scores[keep], det.anchors[keep]
            if len(stability):
                stability = stability[keep]
        scores, anchors = det.scores, det.anchors
        final = post.whole_image_rule(post.snap_to_border(boxes, lb.image_hw, s.border_snap), lb.image_hw, s.whole_image_iou)
        return FastSamResult(
            image_hw=lb.image_hw,
            boxes=final.numpy().astype(np.float32),
            scores=scores.numpy().astype(np.float32),
            masks=masks.numpy(),
            boxes_before_snap=boxes.numpy().astype(np.float32),
            anchors=anchors.numpy(),
            stability=stability.numpy().astype(np.float32),
        )

    # -------------------------------------------------------------- SA-1B / COCO records

    def generate_records(self, image: Any):
        """Everything mode as `MaskRecords` (what `segany everything` writes for SAM too): RLE masks,
        mask bounding boxes, predicted_iou = detection confidence, point_coords = the box centre,
        stability_score as SAM defines it (offset 1 on the mask logits), crop_box = the whole image."""
        from ..predict import mask_ops
        from ..predict.amg import MaskRecords

        image = load_image(image)
        result = self.everything(image, stability_offset=1.0)
        h, w = result.image_hw
        out = MaskRecords((h, w))
        out.counts = rle_io.mask_counts(result.masks)
        out.boxes = mask_ops.masks_to_boxes(result.masks).astype(np.int64)
        out.iou_preds = result.scores.astype(np.float32)
        centres = (result.boxes[:, :2] + result.boxes[:, 2:]) / 2
        out.points = centres.astype(np.float64).reshape(-1, 2)
        out.stability = result.stability.astype(np.float32)
        out.crop_boxes = np.tile(np.asarray([0, 0, w, h], dtype=np.int64), (len(result), 1))
        return out
