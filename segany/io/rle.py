"""Run-length encoding of binary masks, compatible with COCO / pycocotools.

Two forms, both with "size": [height, width]:
- uncompressed: "counts" is a list of run lengths over the mask flattened column by column (Fortran
  order), starting with a run of zeros (0 when the first pixel is set);
- compressed (COCO): "counts" is pycocotools' ASCII string of the same runs.

    rles = encode(masks)                   # many masks at once, uncompressed
    coco = [compress(r) for r in rles]     # COCO strings, JSON-ready
    mask = decode(coco[0])                 # (H, W) bool, from either form

Uncompressed encoding is vectorised over all masks (one pass finds every run boundary). Compressed
(COCO) strings come straight from pycocotools' C encoder: on 480x854 masks it is about 5x faster for one
noisy mask and about 3.5x for a batch of 64 than going through the run lengths, with identical strings.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Union

import numpy as np
import torch

Rle = Dict[str, Any]
MaskArray = Union[np.ndarray, torch.Tensor]


def _as_bool_batch(masks: MaskArray) -> np.ndarray:
    m = masks.detach().cpu().numpy() if torch.is_tensor(masks) else np.asarray(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must be (H, W) or (N, H, W), got shape {m.shape}")
    return m if m.dtype == bool else m != 0


def mask_counts(masks: MaskArray) -> List[np.ndarray]:
    """Run lengths (int64 arrays, column-major, zeros first) of each mask in (N, H, W) or (H, W)."""
    m = _as_bool_batch(masks)
    n, h, w = m.shape
    total = h * w
    if n == 0:
        return []
    if total == 0:
        return [np.zeros(1, dtype=np.int64) for _ in range(n)]
    flat = np.ascontiguousarray(m.transpose(0, 2, 1)).reshape(n, total)  # column-major pixel order
    which, pos = np.nonzero(flat[:, 1:] != flat[:, :-1])  # every run boundary of every mask, sorted
    ends = pos.astype(np.int64) + 1
    first = flat[:, 0]
    splits = np.cumsum(np.bincount(which, minlength=n))[:-1]
    out = []
    for i, run_ends in enumerate(np.split(ends, splits)):
        runs = np.diff(np.concatenate(([0], run_ends, [total])))
        out.append(np.concatenate(([0], runs)) if first[i] else runs)
    return out


def encode(masks: MaskArray) -> List[Rle]:
    """Uncompressed RLEs ({"size": [h, w], "counts": [int, ...]}) of (N, H, W) or (H, W) masks."""
    m = _as_bool_batch(masks)
    h, w = int(m.shape[1]), int(m.shape[2])
    return [{"size": [h, w], "counts": c.tolist()} for c in mask_counts(m)]


def area(rle: Rle) -> int:
    """Number of set pixels of an uncompressed or compressed RLE."""
    if isinstance(rle.get("counts"), (str, bytes)):
        from pycocotools import mask as mask_utils

        return int(mask_utils.area(_coco_bytes(rle)))
    return int(np.asarray(rle["counts"], dtype=np.int64)[1::2].sum())


def _check_rle(rle: Rle) -> tuple:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("an RLE must be a dict with 'size' [h, w] and 'counts'")
    size = rle["size"]
    if len(size) != 2 or int(size[0]) < 0 or int(size[1]) < 0:
        raise ValueError(f"RLE size must be [height, width], got {size}")
    return int(size[0]), int(size[1])


def _coco_bytes(rle: Rle) -> Rle:
    counts = rle["counts"]
    h, w = _check_rle(rle)
    return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: Rle) -> np.ndarray:
    """(H, W) bool mask from an uncompressed or a compressed (COCO string) RLE."""
    h, w = _check_rle(rle)
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        from pycocotools import mask as mask_utils

        return mask_utils.decode(_coco_bytes(rle)).astype(bool)
    runs = np.asarray(counts, dtype=np.int64)
    if runs.ndim != 1 or (runs < 0).any() or runs.sum() != h * w:
        raise ValueError(f"RLE counts must be non-negative run lengths summing to {h}*{w}")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape(w, h).T


def decode_many(rles: Sequence[Rle]) -> np.ndarray:
    """(N, H, W) bool from RLEs of one size."""
    if len(rles) == 0:
        raise ValueError("decode_many needs at least one RLE (the size is unknown otherwise)")
    return np.stack([decode(r) for r in rles])


def compress(rle: Rle) -> Rle:
    """Uncompressed RLE -> COCO compressed RLE with a str "counts" (JSON-ready), as pycocotools writes."""
    from pycocotools import mask as mask_utils

    h, w = _check_rle(rle)
    if isinstance(rle["counts"], (str, bytes)):
        return {"size": [h, w], "counts": _coco_bytes(rle)["counts"].decode("ascii")}
    coco = mask_utils.frPyObjects({"size": [h, w], "counts": [int(c) for c in rle["counts"]]}, h, w)
    return {"size": [h, w], "counts": coco["counts"].decode("ascii")}


def decompress(rle: Rle) -> Rle:
    """COCO compressed RLE -> uncompressed RLE."""
    return encode(decode(rle))[0]


def encode_coco(masks: MaskArray) -> List[Rle]:
    """COCO compressed RLEs (str counts, JSON-ready) of (N, H, W) or (H, W) masks."""
    from pycocotools import mask as mask_utils

    m = _as_bool_batch(masks)
    n, h, w = m.shape
    if n == 0:
        return []
    if h * w == 0:  # pycocotools rejects empty images; the runs path handles them
        return [compress(r) for r in encode(m)]
    # pycocotools wants (H, W, N) uint8 in Fortran order: one copy, bool viewed as uint8 without converting.
    coco = mask_utils.encode(np.asfortranarray(m.view(np.uint8).transpose(1, 2, 0)))
    return [{"size": [h, w], "counts": r["counts"].decode("ascii")} for r in coco]


def to_bbox(rle: Rle) -> List[float]:
    """XYWH box of an RLE's set pixels (zeros for an empty mask), as pycocotools.toBbox."""
    if isinstance(rle.get("counts"), (str, bytes)):  # no need to decode the mask
        from pycocotools import mask as mask_utils

        return [float(v) for v in mask_utils.toBbox(_coco_bytes(rle))]
    mask = decode(rle)
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs[0]), float(ys[0]), float(xs[-1] - xs[0] + 1), float(ys[-1] - ys[0] + 1)]
