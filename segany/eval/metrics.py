"""Figures of the interactive-segmentation literature: IoU with ignore masks, NoC, mIoU after k clicks."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


def iou(pred: np.ndarray, gt: np.ndarray, ignore: Optional[np.ndarray] = None) -> float:
    """Intersection over union of two (H, W) masks, counting only pixels outside `ignore`.

    Both masks empty (on the counted pixels) is a perfect answer: 1.0.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the ground truth {gt.shape}")
    if ignore is not None:
        valid = ~np.asarray(ignore, dtype=bool)
        pred = pred & valid
        gt = gt & valid
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & gt) / union)


def noc(ious: Sequence[float], threshold: float, max_clicks: int) -> int:
    """Number of clicks to reach IoU >= threshold; `max_clicks` when it is never reached within them.

    `ious[k]` is the IoU after k + 1 clicks.
    """
    for k, value in enumerate(ious[:max_clicks]):
        if value >= threshold:
            return k + 1
    return max_clicks


def failed(ious: Sequence[float], threshold: float, max_clicks: int) -> bool:
    """True when the threshold is not reached within `max_clicks` (the literature's NoF count)."""
    return not any(value >= threshold for value in ious[:max_clicks])


def pad_curve(ious: Sequence[float], length: int) -> np.ndarray:
    """An IoU curve of exactly `length` clicks: a curve that stopped early keeps its last value."""
    curve = np.asarray(list(ious)[:length], dtype=np.float64)
    if len(curve) == 0:
        raise ValueError("an IoU curve needs at least one click")
    if len(curve) < length:
        curve = np.concatenate([curve, np.full(length - len(curve), curve[-1])])
    return curve


def mean_curve(curves: Sequence[Sequence[float]], length: int) -> np.ndarray:
    """mIoU after 1..length clicks over all instances."""
    if not curves:
        return np.zeros(0)
    return np.stack([pad_curve(c, length) for c in curves]).mean(axis=0)


def miou_at(curves: Sequence[Sequence[float]], k: int) -> float:
    """mIoU after k clicks."""
    return float(np.mean([pad_curve(c, k)[k - 1] for c in curves])) if curves else float("nan")


def interactive_summary(curves: Sequence[Sequence[float]], max_clicks: int,
                        thresholds: Sequence[float] = (0.85, 0.90)) -> Dict[str, object]:
    """NoC@t, NoF@t (instances never reaching t), mIoU@k for every k and the mean curve."""
    out: Dict[str, object] = {"instances": len(curves), "max_clicks": max_clicks}
    for t in thresholds:
        tag = f"{round(t * 100)}"
        out[f"NoC@{tag}"] = float(np.mean([noc(c, t, max_clicks) for c in curves])) if curves else float("nan")
        out[f"NoF@{tag}"] = int(sum(failed(c, t, max_clicks) for c in curves))
    curve = mean_curve(curves, max_clicks)
    out["mIoU@k"] = {str(k + 1): float(v) for k, v in enumerate(curve)}
    out["curve"] = [float(v) for v in curve]
    return out
