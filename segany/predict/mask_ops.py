"""Mask and box operations for everything mode: point grids, crop boxes, box NMS, the stability score,
boxes from masks, un-cropping and small-region clean-up.

All of them work on whole batches (numpy or torch), never one mask at a time in Python, and reproduce
the released automatic mask generator's arithmetic (float32 box IoU, strict `>` suppression, ties kept
in input order) so that the same masks survive.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import cv2
import numpy as np
import torch

Box = Sequence[int]  # x0, y0, x1, y1 (exclusive x1, y1)


# ----------------------------------------------------------------------------- point grids and crops


def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) x, y points in [0, 1]: cell centres of an n x n grid, x varying fastest."""
    if n_per_side < 1:
        raise ValueError(f"points per side must be at least 1, got {n_per_side}")
    half_cell = 1 / (2 * n_per_side)
    axis = np.linspace(half_cell, 1 - half_cell, n_per_side)
    xs, ys = np.meshgrid(axis, axis)  # (n, n): row = y, column = x
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, downscale: int) -> List[np.ndarray]:
    """One grid per crop layer; layer i has int(n_per_side / downscale**i) points per side."""
    return [build_point_grid(int(n_per_side / (downscale**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    image_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """Crop boxes (x0, y0, x1, y1) and their layer index: the whole image, then (2**i)**2 overlapping
    crops in layer i (1-based), listed column by column (x outer, y inner) as the released code does."""
    height, width = image_size
    boxes: List[List[int]] = [[0, 0, width, height]]
    layers: List[int] = [0]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_w = int(math.ceil((overlap * (per_side - 1) + width) / per_side))
        crop_h = int(math.ceil((overlap * (per_side - 1) + height) / per_side))
        x0s = [int((crop_w - overlap) * i) for i in range(per_side)]
        y0s = [int((crop_h - overlap) * i) for i in range(per_side)]
        for x0 in x0s:
            for y0 in y0s:
                boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
                layers.append(layer)
    return boxes, layers


# ----------------------------------------------------------------------------- boxes


def box_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou_one_to_many(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one float32 box (4,) with (N, 4) boxes, in float32 as torchvision computes it."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = box_area(others)
    w = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area + areas - inter)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression. Returns kept indices, highest score first (ties: input order).

    A box is dropped when its IoU with an already kept, higher-ranked box is > `iou_threshold`.
    Each kept box suppresses the rest in one vectorised step, so the work is O(kept * N).
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    ranked = boxes[order]
    alive = np.ones(len(order), dtype=bool)
    threshold = np.float32(iou_threshold)
    for i in range(len(order)):
        if not alive[i]:
            continue
        rest = slice(i + 1, None)
        candidates = np.flatnonzero(alive[rest]) + i + 1
        if len(candidates) == 0:
            break
        iou = box_iou_one_to_many(ranked[i], ranked[candidates])
        alive[candidates[iou > threshold]] = False
    return order[alive]


def box_xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    out = np.array(boxes, copy=True)
    out[..., 2] = out[..., 2] - out[..., 0]
    out[..., 3] = out[..., 3] - out[..., 1]
    return out


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) int64 x0, y0, x1, y1 with inclusive x1, y1; (0, 0, 0, 0) for an empty mask."""
    masks = as_numpy(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got {masks.shape}")
    n, h, w = masks.shape
    if n == 0:
        return np.zeros((0, 4), dtype=np.int64)
    rows = masks.any(axis=2)  # N, H
    cols = masks.any(axis=1)  # N, W
    # argmax gives the first True; on the reversed array, the last.
    top = rows.argmax(axis=1)
    bottom = h - 1 - rows[:, ::-1].argmax(axis=1)
    left = cols.argmax(axis=1)
    right = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([left, top, right, bottom], axis=1).astype(np.int64)
    boxes[~rows.any(axis=1)] = 0
    return boxes


def is_box_near_crop_edge(boxes: np.ndarray, crop_box: Box, image_box: Box, atol: float = 20.0) -> np.ndarray:
    """(N,) bool: a box (in crop coordinates) within `atol` of a crop edge that is not an image edge.

    Such masks are probably cut by the crop; the neighbouring crop or the full image sees them whole.
    """
    x0, y0 = crop_box[0], crop_box[1]
    uncropped = boxes.astype(np.float32) + np.array([x0, y0, x0, y0], dtype=np.float32)
    crop = np.asarray(crop_box, dtype=np.float32)
    image = np.asarray(image_box, dtype=np.float32)
    near_crop = np.abs(uncropped - crop) <= atol
    near_image = np.abs(uncropped - image) <= atol
    return np.any(near_crop & ~near_image, axis=1)


# ----------------------------------------------------------------------------- logits and masks


def as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def stability_score(logits: np.ndarray, mask_threshold: float, offset: float) -> np.ndarray:
    """IoU between the masks thresholded at `mask_threshold + offset` and `- offset`: (N, H, W) -> (N,) float32.

    The high-threshold mask lies inside the low-threshold one, so IoU is a ratio of pixel counts.
    An empty low-threshold mask gives NaN (0 / 0), which no threshold keeps, as released.
    Counted one mask at a time with numpy (compare + popcount), much faster on a CPU than a
    batched tensor sum, and no bool copy of the whole batch is kept.
    """
    flat = as_numpy(logits).reshape(len(logits), -1)
    dtype = flat.dtype.type
    high, low = dtype(mask_threshold + offset), dtype(mask_threshold - offset)
    inner = np.array([np.count_nonzero(row > high) for row in flat], dtype=np.float32)
    outer = np.array([np.count_nonzero(row > low) for row in flat], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inner / outer


def stability_score_torch(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """stability_score for a float tensor where it is (a GPU's): the same counts and the same float32
    division. (N, H, W) -> (N,) float32, on the tensor's device."""
    inner = (logits > mask_threshold + offset).flatten(1).sum(1).to(torch.float32)
    outer = (logits > mask_threshold - offset).flatten(1).sum(1).to(torch.float32)
    return inner / outer


def uncrop_masks(masks: np.ndarray, crop_box: Box, height: int, width: int) -> np.ndarray:
    """(N, h, w) masks of a crop -> (N, height, width), zero outside the crop."""
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, width, height):
        return masks
    out = np.zeros((masks.shape[0], height, width), dtype=masks.dtype)
    out[:, y0:y1, x0:x1] = masks
    return out


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes ("holes") or drop islands ("islands") smaller than `area_thresh` pixels.

    8-connected components, as released. Returns the mask and whether it changed. When every island
    is small, the largest one is kept so the mask never vanishes.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    fill_holes = mode == "holes"
    working = (mask != fill_holes).astype(np.uint8)  # holes: the background's components
    n_labels, labels, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]  # label 0 is the working mask's background
    small = np.flatnonzero(sizes < area_thresh) + 1
    if len(small) == 0:
        return mask, False
    # Lookup table: label -> pixel value of the cleaned mask.
    if fill_holes:
        # Foreground = the original mask's pixels (working label 0) plus the small holes.
        table = np.zeros(n_labels, dtype=bool)
        table[0] = True
        table[small] = True
    else:
        table = np.ones(n_labels, dtype=bool)
        table[0] = False
        table[small] = False
        if not table.any():
            table[int(np.argmax(sizes)) + 1] = True
    return table[labels], True
