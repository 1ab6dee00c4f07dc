"""Prompt-guided selection: pick, among an image's proposal masks, the ones a prompt asks for.

The second stage of FastSAM, usable over any (N, H, W) stack of boolean masks: FastSAM's everything
result, or SAM's everything-mode masks (`MaskRecords.masks()`, or the "segmentation" of its records).
No network runs here.

Points (x, y in image pixels, label 1 positive / 0 negative), two semantics:
  select_points             ultralytics' FastSAM predictor: every mask that holds at least one positive
                            point (every mask when no point is positive) and no negative point;
                            returns their indices, in proposal order.
  merge_points              FastSAM's own repository (`point_prompt`): one merged mask; masks are visited
                            from the largest to the smallest area, a mask holding a positive point is
                            painted in, one holding a negative point is erased.
Boxes (x1, y1, x2, y2):
  select_boxes              per box, the mask with the highest mask-box IoU
                            (pixels inside / (box area + mask area - pixels inside)); several boxes give
                            the union of their picks, in proposal order.
Text: selection by a text query through CLIP lives in `segany.predict.text_select` (its own module,
  with its own model); it returns indices into the same proposal stack, like the functions here.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np


def _check_masks(masks: Any) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be an (N, H, W) stack, got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def _check_points(points: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray]:
    try:
        points = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("points must be numbers, shape (K, 2)") from None
    if points.ndim == 1 and points.shape == (2,):
        points = points[None]
    if points.ndim != 2 or points.shape[1] != 2 or len(points) == 0:
        raise ValueError(f"points must have shape (K, 2), K >= 1, got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points must be finite numbers")
    if labels is None:
        labels = np.ones(len(points), dtype=np.int64)
    try:
        labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError("point labels must be numbers (1 positive, 0 negative)") from None
    if len(labels) != len(points):
        raise ValueError(f"got {len(points)} points but {len(labels)} labels")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("point labels must be 1 (positive) or 0 (negative)")
    return points, labels.astype(np.int64)


def _pixel_indices(points: np.ndarray, h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Truncate to whole pixels (as the reference casts to integers) and clip into the image."""
    xs = np.clip(np.trunc(points[:, 0]), 0, w - 1).astype(np.int64)
    ys = np.clip(np.trunc(points[:, 1]), 0, h - 1).astype(np.int64)
    return xs, ys


def select_points(masks: Any, points: Any, labels: Any = None) -> np.ndarray:
    """Indices (ascending) of the masks holding a positive point (any mask if none is positive) and no
    negative point: ultralytics' FastSAM point semantics."""
    masks = _check_masks(masks)
    points, labels = _check_points(points, labels)
    _, h, w = masks.shape
    xs, ys = _pixel_indices(points, h, w)
    hits = masks[:, ys, xs]  # (N, K)
    positive = labels == 1
    has_positive = hits[:, positive].any(1) if positive.any() else np.ones(len(masks), dtype=bool)
    has_negative = hits[:, ~positive].any(1)
    return np.flatnonzero(has_positive & ~has_negative)


def merge_points(masks: Any, points: Any, labels: Any = None) -> np.ndarray:
    """One (H, W) mask: FastSAM repository semantics (largest to smallest mask; a positive point inside
    paints the mask in, a negative point inside erases it)."""
    masks = _check_masks(masks)
    points, labels = _check_points(points, labels)
    n, h, w = masks.shape
    xs, ys = _pixel_indices(points, h, w)
    merged = np.zeros((h, w), dtype=bool)
    areas = masks.reshape(n, -1).sum(1)
    for i in sorted(range(n), key=lambda i: -int(areas[i])):  # stable: equal areas keep proposal order
        for x, y, label in zip(xs, ys, labels):
            if masks[i, y, x]:
                merged[masks[i]] = bool(label)
    return merged


def _check_boxes(boxes: Any) -> np.ndarray:
    try:
        boxes = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("boxes must be numbers x1, y1, x2, y2") from None
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"boxes must have shape (4,) or (B, 4), got {boxes.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError("boxes must be finite numbers")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError("boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1")
    return boxes


def box_mask_iou(masks: Any, box: Any) -> np.ndarray:
    """(N,) IoU of each mask with one box (whole-pixel box, truncated and clipped to the image)."""
    masks = _check_masks(masks)
    box = _check_boxes(box)[0]
    n, h, w = masks.shape
    x1, y1, x2, y2 = np.trunc(box).astype(np.int64)
    x1, x2 = np.clip([x1, x2], 0, w)
    y1, y2 = np.clip([y1, y2], 0, h)
    inside = masks[:, y1:y2, x1:x2].reshape(n, -1).sum(1)
    areas = masks.reshape(n, -1).sum(1)
    union = (x2 - x1) * (y2 - y1) + areas - inside
    # float32 division, as the reference computes the ratio (ties and near-ties resolve the same way)
    return inside.astype(np.float32) / np.maximum(union, 1).astype(np.float32)


def select_boxes(masks: Any, boxes: Any) -> np.ndarray:
    """Indices (ascending, unique) of the best mask for each box by mask-box IoU (first on ties)."""
    masks = _check_masks(masks)
    boxes = _check_boxes(boxes)
    if len(masks) == 0:
        return np.zeros(0, dtype=np.int64)
    picks = {int(np.argmax(box_mask_iou(masks, box))) for box in boxes}
    return np.asarray(sorted(picks), dtype=np.int64)


def select(masks: Any, points: Optional[Any] = None, labels: Optional[Any] = None,
           boxes: Optional[Any] = None) -> np.ndarray:
    """Indices (ascending) selected by boxes and/or points with ultralytics' semantics: the union of
    the box picks and the point picks. Without any prompt, every mask."""
    masks = _check_masks(masks)
    if boxes is None and points is None:
        return np.arange(len(masks))
    chosen = np.zeros(len(masks), dtype=bool)
    if boxes is not None:
        chosen[select_boxes(masks, boxes)] = True
    if points is not None:
        chosen[select_points(masks, points, labels)] = True
    return np.flatnonzero(chosen)
