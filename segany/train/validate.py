"""Click-based validation during training: mIoU after 1, 2, ... clicks on held-out objects.

Clicks follow the interactive-segmentation protocol: the first at the point of the object farthest
from its boundary, each next one at the interior-most point of the larger error region (positive in
a false negative, negative in a false positive). The first click uses the 3 multimask outputs and
keeps the one with the highest predicted IoU; later clicks use the single mask with the previous
low-res logits as the mask prompt. IoU is computed at the image's resolution, without ignored pixels.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import nn

from ..predict.transforms import ResizeLongestSide
from .data import EvalObject, ImageRecord


def next_click(gt: np.ndarray, pred: np.ndarray, ignore: Optional[np.ndarray] = None) -> Tuple[float, float, int]:
    """(x, y, label) of the next corrective click; label 1 = positive. gt, pred: (H, W) bool."""
    fn = gt & ~pred
    fp = pred & ~gt
    if ignore is not None:
        fn &= ~ignore
        fp &= ~ignore
    best = (-1.0, 0, 0, 1)
    for region, label in ((fn, 1), (fp, 0)):
        if not region.any():
            continue
        # Pad so that the image border counts as a boundary of the region.
        dist = cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        if dist[y, x] > best[0]:
            best = (float(dist[y, x]), int(x), int(y), label)
    if best[0] < 0:  # nothing left to correct: a positive click inside the object
        ys, xs = np.nonzero(gt)
        return (float(xs[len(xs) // 2]), float(ys[len(ys) // 2]), 1) if len(xs) else (0.0, 0.0, 1)
    return float(best[1]), float(best[2]), best[3]


def iou(pred: np.ndarray, gt: np.ndarray, ignore: Optional[np.ndarray] = None) -> float:
    if ignore is not None:
        pred, gt = pred & ~ignore, gt & ~ignore
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 1.0


@torch.no_grad()
def click_ious(
    model: nn.Module,
    features: Dict[str, torch.Tensor],
    obj: EvalObject,
    input_size: Tuple[int, int],
    num_clicks: int,
) -> List[float]:
    """IoU after each of `num_clicks` simulated clicks on one object."""
    h, w = obj.gt.shape
    transform = ResizeLongestSide(model.image_size)
    coords: List[Tuple[float, float]] = []
    labels: List[int] = []
    pred = np.zeros_like(obj.gt)
    previous = None
    out = []
    for click in range(num_clicks):
        x, y, label = next_click(obj.gt, pred, obj.ignore)
        coords.append((x, y))
        labels.append(label)
        pts = torch.as_tensor(transform.apply_coords(np.array(coords), (h, w)), dtype=torch.float32)[None]
        lbl = torch.as_tensor(labels)[None]
        feats = {k: v.to(model.device) for k, v in features.items()}
        low_res, scores = model.decode(feats, (pts.to(model.device), lbl.to(model.device)), None, previous, click == 0)
        best = int(scores[0].argmax())
        previous = low_res[:, best : best + 1]
        logits = model.postprocess_masks(previous, input_size, (h, w))[0, 0]
        pred = (logits > model.mask_threshold).cpu().numpy()
        out.append(iou(pred, obj.gt, obj.ignore))
    return out


@torch.no_grad()
def evaluate_clicks(
    model: nn.Module,
    records: Sequence[ImageRecord],
    objects: Sequence[EvalObject],
    embed: Callable[[int], Tuple[Dict[str, torch.Tensor], Tuple[int, int]]],
    num_clicks: int = 3,
) -> Dict[int, float]:
    """Mean IoU over objects after k clicks, for k = 1..num_clicks.

    embed(image_index) -> (features of batch 1, input size (h, w) inside the model frame).
    """
    if not objects:
        raise ValueError("no validation objects")
    per_object = []
    for obj in objects:
        features, input_size = embed(obj.image_index)
        per_object.append(click_ious(model, features, obj, input_size, num_clicks))
    table = np.array(per_object)  # objects, clicks
    return {k + 1: float(table[:, k].mean()) for k in range(num_clicks)}
