"""The simulated interactive prompting: click sampler, noisy boxes, round schedule, batching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segany.train.prompts import (
    FIRST,
    MASK_ONLY,
    POINT,
    PromptConfig,
    interactive_rounds,
    masks_to_boxes,
    noisy_boxes,
    round_schedule,
    sample_error_points,
)


def hand_made():
    """gt: a square; pred: the square shifted right by 3, so there are both FN and FP pixels."""
    gt = np.zeros((1, 20, 20), bool)
    gt[0, 5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[0, 5:15, 8:18] = True
    return gt, pred


def test_error_points_lie_in_the_error_region_with_the_right_label():
    gt, pred = hand_made()
    fn = gt & ~pred
    fp = pred & ~gt
    seen = {0: 0, 1: 0}
    for seed in range(200):
        coords, labels = sample_error_points(pred, gt, np.random.default_rng(seed))
        x, y = int(coords[0, 0]), int(coords[0, 1])
        assert coords[0, 0] == x and coords[0, 1] == y  # integer pixel
        if labels[0] == 1:
            assert fn[0, y, x]
        else:
            assert labels[0] == 0 and fp[0, y, x]
        seen[int(labels[0])] += 1
    # Uniform over the error region: FN and FP have 30 pixels each.
    assert 60 < seen[1] < 140 and 60 < seen[0] < 140


def test_error_points_respect_valid_region_and_report_no_error():
    gt, pred = hand_made()
    valid = np.zeros((20, 20), bool)
    valid[:, :10] = True  # only the false negatives (columns 5..7) are valid
    for seed in range(20):
        coords, labels = sample_error_points(pred, gt, np.random.default_rng(seed), valid)
        assert labels[0] == 1 and coords[0, 0] < 8
    coords, labels = sample_error_points(gt, gt, np.random.default_rng(0))
    assert labels.tolist() == [-1] and coords.tolist() == [[0.0, 0.0]]


def test_noisy_boxes_noise_scale_and_cap():
    rng = np.random.default_rng(0)
    box = np.array([[100.0, 200.0, 200.0, 250.0]])  # 100 wide, 50 high
    samples = np.concatenate([noisy_boxes(box, rng, (1000, 1000)) for _ in range(3000)]) - box
    std = samples.std(0)
    assert std[0] == pytest.approx(10, rel=0.1) and std[2] == pytest.approx(10, rel=0.1)
    assert std[1] == pytest.approx(5, rel=0.1) and std[3] == pytest.approx(5, rel=0.1)
    big = np.array([[0.0, 0.0, 900.0, 900.0]])
    noise = np.concatenate([noisy_boxes(big + 50, rng, (1000, 1000)) for _ in range(500)]) - (big + 50)
    assert np.abs(noise).max() <= 20.0 + 1e-9 and np.abs(noise).max() > 15  # 10% of 900 = 90 px: capped at 20
    clipped = noisy_boxes(np.array([[0.0, 0.0, 50.0, 50.0]]), rng, (40, 60))
    assert clipped[0, 0] >= 0 and clipped[0, 3] <= 39 and clipped[0, 2] <= 59


def test_masks_to_boxes():
    gt, _ = hand_made()
    assert masks_to_boxes(gt).tolist() == [[5, 5, 14, 14]]


def test_round_schedule_is_the_papers_eight_plus_two():
    for seed in range(20):
        rounds = round_schedule(8, 2, np.random.default_rng(seed))
        assert len(rounds) == 11 and rounds[0] == FIRST and rounds[-1] == MASK_ONLY
        assert rounds.count(POINT) == 8 and rounds.count(MASK_ONLY) == 2
    positions = {round_schedule(8, 2, np.random.default_rng(s)).index(MASK_ONLY) for s in range(50)}
    assert len(positions) > 3  # the inner mask-only round moves around


@pytest.mark.parametrize("box_probability", [0.0, 1.0])
def test_interactive_rounds_batch_every_instance_and_feed_back_the_mask(box_probability):
    side, low = 64, 16
    gt = torch.zeros(3, side, side, dtype=torch.bool)
    gt[0, 4:20, 4:20] = True
    gt[1, 30:60, 10:30] = True
    gt[2, 40:50, 40:60] = True
    calls = []

    def decode(points, boxes, masks, multimask):
        calls.append((points, boxes, masks, multimask))
        c = 3 if multimask else 1
        torch.manual_seed(len(calls))
        return torch.randn(3, c, low, low, requires_grad=True), torch.rand(3, c, requires_grad=True)

    losses = []
    cfg = PromptConfig(num_point_rounds=3, num_mask_only_rounds=2, box_probability=box_probability)
    results = interactive_rounds(decode, gt, (60, 64), np.random.default_rng(0), cfg, lambda r: losses.append(r))
    assert len(calls) == 6 and [r.kind for r in results][0] == FIRST and len(losses) == 6
    assert [c[3] for c in calls] == [True] + [False] * 5  # multimask only for the single first prompt
    n_points = [0 if c[0] is None else c[0][0].shape[1] for c in calls]
    first_points = 0 if box_probability else 1
    expected = [first_points]
    for r in results[1:]:
        expected.append(expected[-1] + (1 if r.kind == POINT else 0))
    assert n_points == expected
    for i, (points, boxes, masks, _) in enumerate(calls):
        assert (boxes is not None) == bool(box_probability)
        if points is not None:
            assert points[0].shape == (3, points[0].shape[1], 2) and points[1].shape == (3, points[0].shape[1])
        if i == 0:
            assert masks is None
        else:
            assert masks.shape == (3, 1, low, low)
            assert torch.equal(masks, results[i - 1].low_res)  # previous round's trained mask
    if not box_probability:
        # The first point of each instance is on the instance.
        first = calls[0][0][0][:, 0].long()
        assert all(gt[i, first[i, 1], first[i, 0]] for i in range(3))
    else:
        boxes = calls[0][1]
        true_boxes = torch.as_tensor(masks_to_boxes(gt.numpy()), dtype=torch.float32)
        assert torch.all((boxes - true_boxes).abs() <= 20)
