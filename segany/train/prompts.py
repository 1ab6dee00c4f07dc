"""Simulated interactive prompting, as SAM was trained (Kirillov et al., 2023, appendix A).

Per image, every sampled instance is prompted in one batch:
- round 0: a random foreground point, or the ground-truth box with noise (std 10% of the box side,
  at most 20 px) — one kind for the whole batch so that the prompts stack;
- then point rounds: a new point sampled uniformly from the error region of the previous prediction
  (positive in a false negative, negative in a false positive), with the previous low-res logits fed
  back as the mask prompt;
- and mask-only rounds (no new point, mask prompt only): one at a random place among the point rounds,
  the others at the end.
Only round 0 is ambiguous (one point or one box and no mask): it uses the 3 multimask outputs and
trains the lowest-loss one; later rounds use the single-mask token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .losses import LossOutput, sam_loss

FIRST, POINT, MASK_ONLY = "first", "point", "mask"


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, 4) float boxes x0, y0, x1, y1 (inclusive pixel indices); empty masks give 0s."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float64)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min(), ys.min(), xs.max(), ys.max())
    return boxes


def noisy_boxes(
    boxes: np.ndarray,
    rng: np.random.Generator,
    image_size: Tuple[int, int],
    std_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> np.ndarray:
    """Jitter each coordinate by N(0, (std_fraction * side)^2), clipped to +-max_noise px, then to the image.

    boxes: (N, 4) x0, y0, x1, y1; image_size: (h, w) of the valid image region.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    width = boxes[:, 2] - boxes[:, 0]
    height = boxes[:, 3] - boxes[:, 1]
    std = std_fraction * np.stack([width, height, width, height], axis=1)
    noise = np.clip(rng.standard_normal(boxes.shape) * std, -max_noise, max_noise)
    out = boxes + noise
    h, w = image_size
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w - 1)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h - 1)
    # Keep corners ordered: noise can swap them on a thin object.
    x0, x1 = np.minimum(out[:, 0], out[:, 2]), np.maximum(out[:, 0], out[:, 2])
    y0, y1 = np.minimum(out[:, 1], out[:, 3]), np.maximum(out[:, 1], out[:, 3])
    return np.stack([x0, y0, x1, y1], axis=1)


def sample_points_in(regions: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One uniformly random pixel of each (N, H, W) bool region -> coords (N, 2) as (x, y), found (N,) bool."""
    coords = np.zeros((regions.shape[0], 2), dtype=np.float64)
    found = np.zeros(regions.shape[0], dtype=bool)
    for i, region in enumerate(regions):
        flat = np.flatnonzero(region)
        if len(flat):
            pick = flat[rng.integers(len(flat))]
            y, x = divmod(int(pick), region.shape[1])
            coords[i] = (x, y)
            found[i] = True
    return coords, found


def sample_error_points(
    pred: np.ndarray, gt: np.ndarray, rng: np.random.Generator, valid: Optional[np.ndarray] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """A point uniform in the error region of each prediction.

    pred, gt: (N, H, W) bool; valid: (H, W) bool of pixels that count. Returns coords (N, 2) (x, y) and
    labels (N,): 1 where the point fell in a false negative, 0 in a false positive, -1 (the prompt
    encoder's 'not a point') where the prediction has no error left.
    """
    error = pred != gt
    if valid is not None:
        error &= valid[None]
    coords, found = sample_points_in(error, rng)
    labels = np.full(pred.shape[0], -1, dtype=np.int64)
    for i in np.flatnonzero(found):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        labels[i] = 1 if gt[i, y, x] else 0
    coords[~found] = 0.0
    return coords, labels


def round_schedule(num_point_rounds: int, num_mask_only_rounds: int, rng: np.random.Generator) -> List[str]:
    """Kinds of the rounds: 'first', then point rounds with one mask-only round at a random place among
    them and the remaining mask-only rounds at the end (the paper's 8 + 2)."""
    rounds = [POINT] * num_point_rounds
    tail = num_mask_only_rounds
    if num_mask_only_rounds > 0 and num_point_rounds > 0:
        rounds.insert(int(rng.integers(num_point_rounds + 1)), MASK_ONLY)
        tail -= 1
    return [FIRST] + rounds + [MASK_ONLY] * tail


@dataclass
class PromptConfig:
    num_point_rounds: int = 8
    num_mask_only_rounds: int = 2
    box_probability: float = 0.5
    box_noise_fraction: float = 0.1
    box_noise_max: float = 20.0


@dataclass
class RoundResult:
    kind: str
    loss: LossOutput
    low_res: torch.Tensor  # (N, 1, h, w) detached logits of the trained mask, fed to the next round


def downsample_masks(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, H, W) {0,1} -> (N, 1, H/f, W/f) {0,1}: a cell is on when at least half of it is."""
    if factor == 1:
        return masks[:, None].float()
    pooled = F.avg_pool2d(masks[:, None].float(), factor)
    return (pooled >= 0.5).float()


def interactive_rounds(
    decode: Callable[..., Tuple[torch.Tensor, torch.Tensor]],
    gt: torch.Tensor,
    valid_size: Tuple[int, int],
    rng: np.random.Generator,
    cfg: PromptConfig,
    on_round: Optional[Callable[[RoundResult], None]] = None,
    loss_kwargs: Optional[Dict] = None,
    loss_side: Optional[int] = None,
) -> List[RoundResult]:
    """Run one image's simulated interaction; `on_round` backpropagates each round's loss as it comes.

    decode(points, boxes, masks, multimask) -> (low_res (N, C, h, w), iou (N, C)) in the model's input
    frame (points: (coords (N, k, 2), labels (N, k)) or None; boxes (N, 4) or None; masks (N, 1, h, w) or
    None). gt: (N, S, S) bool instance masks in that frame, zero in the padding; valid_size: (h, w) of the
    image inside the S x S frame. loss_side: resolution of the loss (a divisor of S); default S, where
    the logits are upsampled bilinearly as at inference. A coarser one (the low-res 256) is cheaper.
    """
    n, side = gt.shape[0], gt.shape[-1]
    gt_np = gt.cpu().numpy().astype(bool)
    valid = torch.zeros((side, side), dtype=torch.bool)
    valid[: valid_size[0], : valid_size[1]] = True
    valid_np = valid.numpy()
    loss_side = loss_side or side
    if side % loss_side:
        raise ValueError(f"loss resolution {loss_side} must divide the model frame {side}")
    factor = side // loss_side
    target = downsample_masks(gt.float(), factor)  # N, 1, L, L
    valid_low = downsample_masks(valid[None].float(), factor)  # 1, 1, L, L

    use_box = rng.random() < cfg.box_probability
    coords = np.zeros((n, 0, 2))
    labels = np.zeros((n, 0), dtype=np.int64)
    boxes = None
    if use_box:
        boxes = noisy_boxes(
            masks_to_boxes(gt_np), rng, valid_size, cfg.box_noise_fraction, cfg.box_noise_max
        )
    else:
        first, _ = sample_points_in(gt_np, rng)
        coords, labels = first[:, None], np.ones((n, 1), dtype=np.int64)

    results: List[RoundResult] = []
    previous: Optional[torch.Tensor] = None
    for kind in round_schedule(cfg.num_point_rounds, cfg.num_mask_only_rounds, rng):
        if kind == POINT:
            up = F.interpolate(previous, (side, side), mode="bilinear", align_corners=False)[:, 0] > 0
            new_coords, new_labels = sample_error_points(up.numpy(), gt_np, rng, valid_np)
            coords = np.concatenate([coords, new_coords[:, None]], axis=1)
            labels = np.concatenate([labels, new_labels[:, None]], axis=1)
        points = None
        if coords.shape[1]:
            points = (torch.as_tensor(coords, dtype=torch.float32), torch.as_tensor(labels))
        box_t = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32)
        multimask = kind == FIRST  # one point or one box, no mask: ambiguous
        low_res, iou = decode(points, box_t, previous, multimask)
        logits = low_res
        if logits.shape[-1] != loss_side:
            logits = F.interpolate(low_res, (loss_side, loss_side), mode="bilinear", align_corners=False)
        loss = sam_loss(logits, iou, target, valid_low, **(loss_kwargs or {}))
        rows = torch.arange(n)
        previous = low_res.detach()[rows, loss.selected][:, None]
        result = RoundResult(kind, loss, previous)
        if on_round is not None:
            on_round(result)
        results.append(result)
    return results
