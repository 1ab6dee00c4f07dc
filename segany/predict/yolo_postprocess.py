"""Pre- and post-processing of YOLOv8-seg / FastSAM, as ultralytics 8.4.190's FastSAM predictor does it.

letterbox        -> the network input (minimal rectangle, multiple of 32, grey 114 padding)
select_candidates, nms -> detections (x1 y1 x2 y2 score class + mask coefficients) in letterbox pixels
boxes_to_image   -> boxes in original-image pixels, clipped
assemble_masks   -> masks at the original resolution (the reference's "retina masks")
snap_to_border, whole_image_rule -> FastSAM's final box adjustments
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

STRIDE = 32
PAD_VALUE = 114
MAX_NMS_CANDIDATES = 30000
CLASS_OFFSET = 7680  # separates the classes' boxes in one NMS pass (larger than any image side)


@dataclass
class Letterbox:
    """Where the image sits in the network input."""

    input_hw: Tuple[int, int]  # network input (H, W)
    image_hw: Tuple[int, int]  # original (h, w)
    new_hw: Tuple[int, int]  # the resized image inside the input
    pad_tblr: Tuple[int, int, int, int]


def check_imgsz(imgsz: int) -> int:
    """The inference size, rounded up to a multiple of the stride (as the reference does)."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or imgsz < STRIDE:
        raise ValueError(f"imgsz must be an integer >= {STRIDE}, got {imgsz!r}")
    return int(math.ceil(int(imgsz) / STRIDE) * STRIDE)


def letterbox(image: np.ndarray, imgsz: int) -> Tuple[np.ndarray, Letterbox]:
    """Resize an (h, w, 3) uint8 image so that its longer side is imgsz (up or down), then pad each side
    to the next multiple of 32 (split evenly, one more row/column at the bottom/right)."""
    h, w = image.shape[:2]
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = round(w * r), round(h * r)  # Python's round, half to even
    dw, dh = (imgsz - new_w) % STRIDE / 2, (imgsz - new_h) % STRIDE / 2
    if (new_w, new_h) != (w, h):
        # OpenCV's INTER_LINEAR on uint8 (fixed-point weights): the reference's exact pixels.
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    box = Letterbox((image.shape[0], image.shape[1]), (h, w), (new_h, new_w), (top, bottom, left, right))
    return np.ascontiguousarray(image), box


def to_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def xywh_to_xyxy(xywh: torch.Tensor) -> torch.Tensor:
    half_w, half_h = xywh[..., 2] / 2, xywh[..., 3] / 2
    return torch.stack((xywh[..., 0] - half_w, xywh[..., 1] - half_h, xywh[..., 0] + half_w, xywh[..., 1] + half_h), -1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int = 0) -> np.ndarray:
    """Greedy non-maximum suppression: visit boxes by descending score (stable), keep a box unless a kept
    one overlaps it with IoU > iou. Float32 areas and IoU, the threshold compared in float64.
    Returns the kept indices in score order (at most max_keep when > 0)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[order, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        if max_keep and len(keep) >= max_keep:
            break
        rest = slice(i + 1, None)
        inter_w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        inter_h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = inter_w * inter_h
        overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= overlap.astype(np.float64) > iou
    return np.asarray(keep, dtype=np.int64)


@dataclass
class Detections:
    """NMS survivors: anchor indices, boxes (K, 4) xyxy in letterbox pixels, scores, classes, coefficients."""

    anchors: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    coefs: torch.Tensor


def detect(pred: torch.Tensor, conf: float, iou: float, max_det: int = 300, num_classes: int = 1) -> Detections:
    """One image's (4 + nc + nm, N) prediction -> candidates with score > conf -> NMS (per class)."""
    scores_all = pred[4 : 4 + num_classes]
    score, cls = scores_all.max(0)
    cand = torch.nonzero(score > conf).flatten()
    if len(cand) > MAX_NMS_CANDIDATES:
        cand = cand[score[cand].argsort(descending=True)[:MAX_NMS_CANDIDATES]]
    boxes = xywh_to_xyxy(pred[:4, cand].T)
    offset = cls[cand].to(boxes.dtype)[:, None] * CLASS_OFFSET
    keep = torch.from_numpy(nms((boxes + offset).numpy(), score[cand].numpy(), iou, max_det))
    idx = cand[keep]
    return Detections(
        anchors=idx, boxes=boxes[keep], scores=score[idx], classes=cls[idx], coefs=pred[4 + num_classes :, idx].T
    )


def boxes_to_image(boxes: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """Letterbox xyxy -> original-image xyxy (per-axis gains of the rounded resize), clipped to the image."""
    h, w = lb.image_hw
    top, _, left, _ = lb.pad_tblr
    new_h, new_w = lb.new_hw
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / (new_w / w)).clamp_(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / (new_h / h)).clamp_(0, h)
    return out


def _content_crop(mh: int, mw: int, h: int, w: int) -> Tuple[int, int, int, int]:
    """Rows and columns of an (mh, mw) map that hold the image (the rest is letterbox padding)."""
    gain = min(mh / h, mw / w)
    ch, cw = max(round(h * gain), 1), max(round(w * gain), 1)
    top, left = round((mh - ch) / 2 - 0.1), round((mw - cw) / 2 - 0.1)
    return top, top + ch, left, left + cw


def assemble_masks(protos: torch.Tensor, coefs: torch.Tensor, boxes: torch.Tensor, image_hw: Tuple[int, int],
                   stability_offset: float = 0.0, chunk_pixels: int = 16_000_000) -> Tuple[torch.Tensor, torch.Tensor]:
    """(nm, mh, mw) prototypes, (K, nm) coefficients, (K, 4) boxes in image pixels -> (K, h, w) bool masks.

    Logits = coefficients x prototypes; upsampled first by the smallest factor f (1, 2 or 4) that puts the
    letterbox padding on whole pixels, the padding cropped, resized (bilinear) to the image, > 0, then
    zeroed outside each box (pixel (y, x) kept when x1 <= x < x2 and y1 <= y < y2).

    With stability_offset > 0 also returns each mask's stability score (SAM's definition, threshold 0):
    area(logit > offset) / area(logit > -offset) inside the box; else an empty tensor."""
    h, w = image_hw
    nm, mh, mw = protos.shape
    masks = torch.zeros((len(coefs), h, w), dtype=torch.bool)
    stability = torch.zeros(len(coefs) if stability_offset > 0 else 0, dtype=torch.float32)
    if len(coefs) == 0:
        return masks, stability
    logits = (coefs.float() @ protos.float().reshape(nm, -1)).reshape(-1, mh, mw)
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    per_chunk = max(1, chunk_pixels // (h * w + f * f * mh * mw))
    cols = torch.arange(w, dtype=boxes.dtype)
    rows = torch.arange(h, dtype=boxes.dtype)
    for start in range(0, len(logits), per_chunk):
        sl = slice(start, start + per_chunk)
        part = logits[sl][None]  # (1, n, mh, mw)
        if f > 1:
            part = F.interpolate(part, scale_factor=f, mode="bilinear", align_corners=False)
        fh, fw = part.shape[2:]
        if (fh, fw) != (h, w):
            t, b, l, r = _content_crop(fh, fw, h, w)
            part = F.interpolate(part[..., t:b, l:r], (h, w), mode="bilinear", align_corners=False)
        part = part[0]  # (n, h, w)
        x1, y1, x2, y2 = (boxes[sl, k, None] for k in range(4))
        in_cols = ((cols >= x1) & (cols < x2))[:, None, :]  # (n, 1, w)
        in_rows = ((rows >= y1) & (rows < y2))[:, :, None]  # (n, h, 1)
        torch.gt(part, 0, out=masks[sl])
        masks[sl] &= in_cols  # the box is separable: no (n, h, w) box mask is built
        masks[sl] &= in_rows
        if stability_offset > 0:
            inside = in_cols & in_rows
            high = ((part > stability_offset) & inside).sum((1, 2))
            low = ((part > -stability_offset) & inside).sum((1, 2))
            stability[sl] = torch.where(low > 0, high.float() / low.clamp(min=1).float(), torch.zeros(()))
    return masks, stability


def snap_to_border(boxes: torch.Tensor, image_hw: Tuple[int, int], threshold: float = 20) -> torch.Tensor:
    """FastSAM: box sides within `threshold` px of the image border are moved onto it."""
    h, w = image_hw
    out = boxes.clone()
    out[out[:, 0] < threshold, 0] = 0
    out[out[:, 1] < threshold, 1] = 0
    out[out[:, 2] > w - threshold, 2] = w
    out[out[:, 3] > h - threshold, 3] = h
    return out


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def whole_image_rule(boxes: torch.Tensor, image_hw: Tuple[int, int], iou: float = 0.9) -> torch.Tensor:
    """FastSAM: a box covering the image with IoU > iou becomes exactly the whole image."""
    h, w = image_hw
    full = torch.tensor([[0, 0, w, h]], dtype=torch.float32)
    out = boxes.clone()
    if len(out):
        out[box_iou(full, out.float())[0] > iou] = full[0].to(out.dtype)
    return out
