"""SAM's training losses against values computed by hand (plain Python math, pixel by pixel)."""
from __future__ import annotations

import math

import pytest
import torch

from segany.train.losses import dice_loss, mask_iou, sam_loss, sigmoid_focal_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal_by_hand(logits, targets, alpha=0.25, gamma=2.0):
    total = 0.0
    for x, t in zip(logits, targets):
        p = sig(x)
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p if t else 1 - p
        a = alpha if t else 1 - alpha
        total += a * ce * (1 - p_t) ** gamma
    return total / len(logits)


def dice_by_hand(logits, targets, smooth=1.0):
    p = [sig(x) for x in logits]
    inter = sum(pi * t for pi, t in zip(p, targets))
    return 1 - (2 * inter + smooth) / (sum(p) + sum(targets) + smooth)


LOGITS = [[2.0, -1.0], [0.5, -3.0]]
TARGET = [[1, 0], [0, 1]]


def flat(a):
    return [v for row in a for v in row]


def test_focal_loss_matches_hand_computation():
    got = sigmoid_focal_loss(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert got.item() == pytest.approx(focal_by_hand(flat(LOGITS), flat(TARGET)), rel=1e-6)
    # The two terms by hand for the first pixel: x=2, t=1 -> 0.25 * log(1+e^-2) * (1-sig(2))^2.
    first = 0.25 * math.log(1 + math.exp(-2)) * (1 - sig(2)) ** 2
    one = sigmoid_focal_loss(torch.tensor([[2.0]]), torch.tensor([[1]]))
    assert one.item() == pytest.approx(first, rel=1e-6)


def test_dice_loss_matches_hand_computation():
    got = dice_loss(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert got.item() == pytest.approx(dice_by_hand(flat(LOGITS), flat(TARGET)), rel=1e-6)
    # A confident perfect prediction has (almost) no dice loss; its complement almost 1.
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert dice_loss(20 * (2 * target - 1), target).item() < 1e-6
    assert dice_loss(-20 * (2 * target - 1), target).item() > 0.79  # 1 - 1/5 with smooth=1


def test_valid_mask_excludes_padding():
    logits = torch.tensor([[2.0, -1.0, 9.0], [0.5, -3.0, 9.0]])
    target = torch.tensor([[1, 0, 0], [0, 1, 0]])
    valid = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert sigmoid_focal_loss(logits, target, valid).item() == pytest.approx(focal_by_hand(flat(LOGITS), flat(TARGET)), rel=1e-6)
    assert dice_loss(logits, target, valid).item() == pytest.approx(dice_by_hand(flat(LOGITS), flat(TARGET)), rel=1e-6)
    # Valid part: pred (logit > 0) at (0,0) and (1,0), target at (0,0) and (1,1): inter 1, union 3.
    # The padding column (predicted on, target off) would make it 1/5 if it counted.
    assert mask_iou(logits, target, valid).item() == pytest.approx(1 / 3)
    assert mask_iou(logits, target).item() == pytest.approx(1 / 5)


def test_mask_iou_by_hand():
    logits = torch.tensor([[[1.0, 1.0, -1.0], [1.0, -1.0, -1.0]]])
    target = torch.tensor([[[1, 0, 0], [1, 1, 0]]])
    # pred {(0,0),(0,1),(1,0)}, gt {(0,0),(1,0),(1,1)}: inter 2, union 4.
    assert mask_iou(logits, target).item() == pytest.approx(0.5)
    assert mask_iou(-torch.ones(1, 2, 2), torch.zeros(1, 2, 2)).item() == 1.0  # both empty


def test_sam_loss_keeps_only_the_lowest_loss_of_three_masks():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:6, 2:6] = 1
    target[1, :, :4, :] = 1
    good = 10 * (2 * target - 1)
    logits = torch.randn(2, 3, 8, 8)
    logits[0, 2] = good[0, 0]  # best mask of prompt 0 is index 2
    logits[1, 0] = good[1, 0]  # of prompt 1, index 0
    logits.requires_grad_(True)
    iou_pred = torch.full((2, 3), 0.5, requires_grad=True)
    out = sam_loss(logits, iou_pred, target)
    assert out.selected.tolist() == [2, 0]
    focal = sigmoid_focal_loss(logits.detach(), target)
    dice = dice_loss(logits.detach(), target)
    exp_focal = (focal[0, 2] + focal[1, 0]) / 2
    exp_dice = (dice[0, 2] + dice[1, 0]) / 2
    actual = mask_iou(logits.detach(), target)
    exp_iou = ((iou_pred.detach() - actual) ** 2).mean()
    assert out.focal.item() == pytest.approx(exp_focal.item(), rel=1e-6)
    assert out.dice.item() == pytest.approx(exp_dice.item(), rel=1e-6)
    assert out.iou.item() == pytest.approx(exp_iou.item(), rel=1e-6)
    assert out.total.item() == pytest.approx(20 * exp_focal.item() + exp_dice.item() + exp_iou.item(), rel=1e-6)
    assert actual[0, 2].item() == 1.0 and out.mask_iou.tolist() == [1.0, 1.0]
    out.total.backward()
    # Only the selected masks receive gradient from the mask loss; every IoU prediction is trained.
    grad_norms = logits.grad.flatten(2).abs().sum(-1)
    assert grad_norms[0, 2] > 0 and grad_norms[1, 0] > 0
    assert grad_norms[0, 0] == 0 and grad_norms[0, 1] == 0 and grad_norms[1, 1] == 0 and grad_norms[1, 2] == 0
    assert torch.all(iou_pred.grad != 0)
    assert torch.allclose(iou_pred.grad, 2 * (iou_pred.detach() - actual) / 6)


def test_single_mask_output_uses_that_mask():
    target = torch.zeros(1, 4, 4)
    target[0, :2] = 1
    logits = torch.randn(1, 1, 4, 4)
    out = sam_loss(logits, torch.zeros(1, 1), target)
    assert out.selected.tolist() == [0]
    expected = 20 * sigmoid_focal_loss(logits, target[:, None]) + dice_loss(logits, target[:, None])
    expected = expected[0, 0] + mask_iou(logits, target[:, None])[0, 0] ** 2
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
