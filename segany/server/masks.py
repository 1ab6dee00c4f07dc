"""Masks as COCO RLE for the server: encode, check what clients send.

pycocotools' decoder writes run lengths without bounds checks, so RLE from a client is parsed and its
run lengths are checked to add up to exactly H*W before pycocotools sees it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from ..io import coco as coco_io
from ..io import rle as rle_io


def encode(mask: np.ndarray) -> Dict[str, Any]:
    """A boolean (H, W) mask -> {"counts": compressed RLE str, "area": int, "bbox": [x, y, w, h]}."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    rle = rle_io.encode_coco(mask)[0]  # pycocotools' C encoder underneath: fast on the interactive path
    return {"counts": rle["counts"], "area": rle_io.area(rle), "bbox": rle_io.to_bbox(rle)}


def parse_counts_string(counts: str) -> List[int]:
    """Run lengths from a COCO compressed RLE string (the LEB128-like code of pycocotools)."""
    runs: List[int] = []
    pos, n = 0, len(counts)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("RLE counts string ends in the middle of a number")
            c = ord(counts[pos]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE counts string has an invalid character {counts[pos]!r}")
            value |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            pos += 1
            shift += 1
            if not more and (c & 0x10):
                value |= -1 << (5 * shift)
            if shift > 8:
                raise ValueError("RLE counts string has a number that is too long")
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _check_runs(runs: Sequence[int], height: int, width: int) -> None:
    if any(r < 0 for r in runs):
        raise ValueError("RLE run lengths must not be negative")
    total = sum(runs)
    if total != height * width:
        raise ValueError(f"RLE run lengths add up to {total}, but the image has {height}x{width} = {height * width} pixels")


def from_client(segmentation: Any, height: int, width: int) -> Dict[str, Any]:
    """Check a client's COCO RLE {"size": [h, w], "counts": str | [int]} for a (height, width) image.

    Returns {"counts", "area", "bbox"} with compressed counts. Raises ValueError on anything wrong.
    """
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError('segmentation must be COCO RLE: {"size": [h, w], "counts": ...}')
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or [int(v) for v in size] != [height, width]:
        raise ValueError(f"segmentation size {size} does not match the image size [{height}, {width}]")
    counts = segmentation["counts"]
    if isinstance(counts, str):
        _check_runs(parse_counts_string(counts), height, width)
    elif isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise ValueError("uncompressed RLE counts must be integers")
        _check_runs(counts, height, width)
    else:
        raise ValueError("RLE counts must be a string (compressed) or a list of integers (uncompressed)")
    rle = rle_io.compress({"size": [height, width], "counts": counts})  # the runs are checked: safe now
    area = rle_io.area(rle)
    if area == 0:
        raise ValueError("the mask is empty")
    return {"counts": rle["counts"], "area": area, "bbox": rle_io.to_bbox(rle)}


def from_coco(segmentation: Any, height: int, width: int) -> Dict[str, Any]:
    """COCO polygons, uncompressed or compressed RLE of an imported annotation -> compressed counts etc."""
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= 6]
        if not polygons:
            raise ValueError("polygon segmentation has no polygon with at least 3 points")
        rle = coco_io.polygons_rle(polygons, height, width)  # checks coordinates and counts first
        return from_client(rle, height, width)
    return from_client(segmentation, height, width)

