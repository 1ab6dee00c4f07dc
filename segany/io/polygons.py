"""Masks <-> polygons with holes, with a simplification tolerance.

    polys = mask_to_polygons(mask, tolerance=1.0)   # [{"exterior": (K, 2), "holes": [(K, 2), ...]}, ...]
    mask = polygons_to_mask(polys, height, width)
    coco = to_coco_polygons(polys)                   # [[x0, y0, x1, y1, ...], ...] (exteriors only)

Vertices are pixel centres (x, y) of the boundary pixels, as OpenCV traces them. With tolerance 0 the
round trip mask -> polygons -> mask is exact; a tolerance > 0 (Douglas-Peucker, cv2.approxPolyDP, in
pixels) trades a few boundary pixels for far fewer vertices, which annotation tools need.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import cv2
import numpy as np

Polygon = Dict[str, Any]  # {"exterior": (K, 2) int array, "holes": [(K, 2) int arrays]}


def _check_mask(mask: Any) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    return (m != 0).astype(np.uint8)


def _simplify(contour: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance > 0 and len(contour) > 3:
        simplified = cv2.approxPolyDP(contour, float(tolerance), True)
        if len(simplified) >= 3:
            contour = simplified
    return contour.reshape(-1, 2)


def mask_to_polygons(mask: Any, tolerance: float = 0.0, min_area: float = 0.0) -> List[Polygon]:
    """Each connected part of the mask (8-connected) as an exterior ring with its hole rings.

    `tolerance`: maximum distance in pixels between the simplified and the traced outline (0: exact).
    `min_area`: drop parts (and holes) whose traced polygon area is below this many square pixels.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    m = _check_mask(mask)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]  # (N, 4): next, previous, first child, parent
    polygons: List[Polygon] = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue  # a hole: attached to its parent below
        if min_area and cv2.contourArea(contour) < min_area and len(contour) > 2:
            continue
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            hole = contours[child]
            if not (min_area and cv2.contourArea(hole) < min_area):
                holes.append(_simplify(hole, tolerance))
            child = hierarchy[child][0]
        polygons.append({"exterior": _simplify(contour, tolerance), "holes": holes})
    return polygons


def polygons_to_mask(polygons: Sequence[Polygon], height: int, width: int) -> np.ndarray:
    """(H, W) bool from polygons as mask_to_polygons returns them (boundary pixels included)."""
    out = np.zeros((int(height), int(width)), dtype=np.uint8)
    # Larger parts first, so that a part lying inside another part's hole is drawn after that hole.
    order = sorted(polygons, key=lambda p: -abs(cv2.contourArea(np.asarray(p["exterior"], np.int32).reshape(-1, 1, 2))))
    for poly in order:
        exterior = np.asarray(poly["exterior"], dtype=np.int32).reshape(-1, 1, 2)
        if len(exterior) == 0:
            continue
        cv2.fillPoly(out, [exterior], 1)
        cv2.polylines(out, [exterior], True, 1)
        holes = [np.asarray(h, dtype=np.int32).reshape(-1, 1, 2) for h in poly.get("holes", []) if len(h)]
        if holes:
            # A hole ring runs through the object's pixels around the hole: clear inside, redraw the ring.
            cv2.fillPoly(out, holes, 0)
            cv2.polylines(out, holes, True, 1)
    return out.astype(bool)


def to_coco_polygons(polygons: Sequence[Polygon]) -> List[List[float]]:
    """COCO "segmentation" polygons: flat [x0, y0, x1, y1, ...] per exterior ring (COCO has no holes)."""
    out = []
    for poly in polygons:
        ring = np.asarray(poly["exterior"], dtype=np.float64).reshape(-1, 2)
        if len(ring) < 3:  # COCO readers need at least 3 vertices: widen a dot or a line to a triangle
            ring = np.concatenate([ring, ring[-1:] + [0.0, 0.5], ring[-1:] + [0.5, 0.0]])[:3] if len(ring) == 1 else np.concatenate([ring, ring[:1] + 0.5])
        out.append(ring.reshape(-1).tolist())
    return out


def has_holes(polygons: Sequence[Polygon]) -> bool:
    return any(len(p.get("holes", [])) for p in polygons)
