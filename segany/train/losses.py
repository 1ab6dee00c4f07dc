"""SAM's training losses (Kirillov et al., 2023, section 3 and appendix A).

Mask loss: focal + dice on the mask logits, weighted 20:1. For an ambiguous prompt the decoder
returns 3 masks and only the one with the lowest mask loss is backpropagated. The IoU head is
trained with the mean squared error between its prediction and the actual IoU of each predicted
mask with the ground truth.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0
IOU_WEIGHT = 1.0


def _valid_or_ones(target: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(target) if valid is None else valid.to(target.dtype).expand_as(target)


def sigmoid_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) averaged over the valid pixels of each mask.

    logits, target: (..., H, W); valid: broadcastable 0/1 mask of the pixels that count (not padding).
    Returns (...,).
    """
    target = target.to(logits.dtype).expand_as(logits)
    weight = _valid_or_ones(target, valid)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return (loss * weight).sum((-2, -1)) / weight.sum((-2, -1)).clamp(min=1.0)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None, smooth: float = 1.0
) -> torch.Tensor:
    """1 - soft Dice coefficient of sigmoid(logits) with the target, per mask. Returns (...,)."""
    target = target.to(logits.dtype).expand_as(logits)
    weight = _valid_or_ones(target, valid)
    prob = logits.sigmoid() * weight
    target = target * weight
    inter = (prob * target).sum((-2, -1))
    total = prob.sum((-2, -1)) + target.sum((-2, -1))
    return 1 - (2 * inter + smooth) / (total + smooth)


@torch.no_grad()
def mask_iou(logits: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """IoU of the thresholded masks (logit > 0) with the target, per mask; 1 where both are empty."""
    pred = logits > 0
    gt = (target > 0.5).expand_as(pred)
    if valid is not None:
        keep = valid.expand_as(gt) > 0.5
        pred, gt = pred & keep, gt & keep
    inter = (pred & gt).sum((-2, -1)).float()
    union = (pred | gt).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1.0), torch.ones_like(union))


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar, what is backpropagated
    focal: torch.Tensor  # scalar, of the selected masks
    dice: torch.Tensor  # scalar, of the selected masks
    iou: torch.Tensor  # scalar, MSE of the IoU head over every predicted mask
    selected: torch.Tensor  # (B,) index of the mask each prompt trained
    mask_iou: torch.Tensor  # (B,) actual IoU of the selected masks


def sam_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    focal_weight: float = FOCAL_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
    iou_weight: float = IOU_WEIGHT,
) -> LossOutput:
    """SAM's loss for a batch of prompts.

    logits: (B, C, H, W) with C = 3 (ambiguous prompt) or 1; iou_pred: (B, C); target: (B, 1, H, W) or
    (B, H, W) in {0, 1}; valid: (B, 1, H, W), (1, 1, H, W) or None.
    Of the C masks only the lowest-loss one per prompt contributes to the mask loss; every mask's IoU
    prediction is regressed to its actual IoU.
    """
    if target.dim() == 3:
        target = target[:, None]
    target = target.to(logits.dtype)
    focal = sigmoid_focal_loss(logits, target, valid)  # B, C
    dice = dice_loss(logits, target, valid)  # B, C
    per_mask = focal_weight * focal + dice_weight * dice
    selected = per_mask.detach().argmin(dim=1)  # B
    rows = torch.arange(logits.shape[0], device=logits.device)
    actual_iou = mask_iou(logits.detach(), target, valid)  # B, C
    iou_loss = F.mse_loss(iou_pred, actual_iou.to(iou_pred.dtype))
    focal_sel, dice_sel = focal[rows, selected].mean(), dice[rows, selected].mean()
    total = focal_weight * focal_sel + dice_weight * dice_sel + iou_weight * iou_loss
    return LossOutput(total, focal_sel.detach(), dice_sel.detach(), iou_loss.detach(), selected, actual_iou[rows, selected])
