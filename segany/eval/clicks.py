"""The click simulator of the interactive-segmentation protocols.

Rules (as in the SAM paper and the interactive-segmentation literature):
- first click: positive, at the interior point of the object farthest from its boundary;
- next click: in the largest error region (a connected component, 8-connectivity, of either the missed
  pixels, ground truth but not predicted, or the false pixels, predicted but not ground truth),
  at that region's interior point farthest from its boundary; positive in a missed region, negative in a
  false one.

Details that decide the exact pixel:
- distances are exact Euclidean distances (cv2.distanceTransform, DIST_L2 with DIST_MASK_PRECISE) to
  the nearest pixel outside the region; the image border counts as boundary (the region is padded
  with one background pixel on every side), so a region touching the edge is not clicked on the edge;
- ignored pixels (GrabCut's uncertain band, COCO crowd regions) are never errors and never clicked;
  they also bound the error regions, since an error region is made of non-ignored pixels only;
- ties: between regions of equal area the missed (positive) region wins, then the one whose first
  pixel comes first in row-major order; between pixels at the same distance, the first in row-major
  order (smallest y, then smallest x);
- clicks are pixel centres given as (x, y) = (column, row), the convention of the SAM prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np


@dataclass(frozen=True)
class Click:
    x: int  # column
    y: int  # row
    positive: bool

    @property
    def label(self) -> int:
        return 1 if self.positive else 0


def distance_to_boundary(region: np.ndarray) -> np.ndarray:
    """(H, W) float32: each region pixel's distance to the nearest pixel outside it or to the border."""
    padded = np.pad(region.astype(np.uint8), 1)  # the image border is boundary
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return dist[1:-1, 1:-1]


def farthest_interior_point(region: np.ndarray) -> Optional[tuple]:
    """(x, y) of the region pixel farthest from its boundary; the first in row-major order on ties."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return None
    dist = distance_to_boundary(region)
    index = int(np.argmax(dist))  # argmax returns the first maximum in row-major order
    y, x = divmod(index, region.shape[1])
    return x, y


def first_click(gt: np.ndarray, ignore: Optional[np.ndarray] = None) -> Optional[Click]:
    """The positive click at the object's interior point farthest from its boundary."""
    region = np.asarray(gt, dtype=bool)
    if ignore is not None:
        region = region & ~np.asarray(ignore, dtype=bool)
    point = farthest_interior_point(region)
    return None if point is None else Click(point[0], point[1], True)


def _largest_component(errors: np.ndarray):
    """(area, first row-major pixel index, component mask) of the largest 8-connected component."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(errors.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = np.flatnonzero(areas == areas.max()) + 1
    flat = labels.reshape(-1)
    # on equal areas, the component whose first pixel comes first in row-major order
    firsts = [int(np.argmax(flat == label)) for label in largest]
    best = int(largest[int(np.argmin(firsts))])
    return int(areas[best - 1]), min(firsts), labels == best


def next_click(gt: np.ndarray, pred: np.ndarray, ignore: Optional[np.ndarray] = None) -> Optional[Click]:
    """The next simulated click for prediction `pred` of object `gt`; None when nothing is wrong."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the ground truth {gt.shape}")
    valid = np.ones_like(gt) if ignore is None else ~np.asarray(ignore, dtype=bool)
    missed = gt & ~pred & valid
    false = pred & ~gt & valid
    candidates = []
    for positive, errors in ((True, missed), (False, false)):
        found = _largest_component(errors)
        if found is not None:
            area, first_index, component = found
            # sort key: larger area first, then positive before negative, then row-major position
            candidates.append(((-area, 0 if positive else 1, first_index), positive, component))
    if not candidates:
        return None
    _, positive, component = min(candidates, key=lambda c: c[0])
    x, y = farthest_interior_point(component)
    return Click(x, y, positive)
