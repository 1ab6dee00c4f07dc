"""The click simulator and the metrics on small hand-made masks."""
from __future__ import annotations

import numpy as np
import pytest

from segany.eval.clicks import Click, distance_to_boundary, farthest_interior_point, first_click, next_click
from segany.eval.metrics import interactive_summary, iou, mean_curve, miou_at, noc


def rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_first_click_is_the_centre_of_an_odd_square():
    gt = rect((20, 30), 4, 11, 10, 17)  # 7x7 square, centre (x=13, y=7)
    assert first_click(gt) == Click(13, 7, True)


def test_first_click_picks_the_thick_part_of_an_l_shape():
    gt = rect((40, 40), 5, 35, 5, 10) | rect((40, 40), 20, 35, 5, 35)  # thin bar + 15-row thick block
    click = first_click(gt)
    # the thick block spans rows 20..34: the farthest points lie on its middle row 27
    assert click.y == 27 and 12 <= click.x <= 27 and click.positive


def test_ties_go_to_the_first_pixel_in_row_major_order():
    gt = rect((10, 12), 2, 4, 2, 10)  # 2 rows: every pixel of the inner run is at distance 1
    dist = distance_to_boundary(gt)
    assert dist.max() == pytest.approx(1.0)
    assert farthest_interior_point(gt) == (2, 2)


def test_image_border_counts_as_boundary():
    gt = np.zeros((9, 30), dtype=bool)
    gt[:, :9] = True  # touches the top, bottom and left edges: centre (4, 4) is farthest
    gt[:, 9:] = False
    assert first_click(gt) == Click(4, 4, True)


def test_next_click_is_positive_in_the_largest_missed_region():
    gt = rect((30, 30), 5, 25, 5, 25)
    pred = gt.copy()
    pred[5:25, 15:25] = False  # right half missed: 20 rows x 10 columns (x 15..24)
    pred[5:8, 5:8] = False  # a small missed corner
    click = next_click(gt, pred)
    assert click.positive
    assert pred[click.y, click.x] == False and gt[click.y, click.x]  # noqa: E712
    # distance 5 is the maximum: x = 19 (5 to column 14) on rows 9..20 (5 to rows 4 and 25), and x = 20;
    # the first of them in row-major order is (19, 9)
    assert click == Click(19, 9, True)


def test_next_click_is_negative_in_a_larger_false_region():
    gt = rect((40, 40), 10, 20, 10, 20)
    pred = gt.copy()
    pred[10:12, 10:12] = False  # missed 4 pixels
    pred[25:36, 25:36] = True  # false 11x11 square, centre (30, 30)
    assert next_click(gt, pred) == Click(30, 30, False)


def test_equal_areas_prefer_the_missed_region():
    gt = rect((20, 20), 0, 5, 0, 5)
    pred = rect((20, 20), 10, 15, 10, 15)  # missed 5x5 and false 5x5
    click = next_click(gt, pred)
    assert click == Click(2, 2, True)


def test_no_error_gives_no_click():
    gt = rect((10, 10), 2, 6, 2, 6)
    assert next_click(gt, gt.copy()) is None


def test_ignore_band_is_never_an_error_nor_clicked():
    gt = rect((30, 30), 10, 20, 10, 20)
    ignore = rect((30, 30), 8, 22, 8, 22) & ~gt  # a 2-pixel band around the object
    pred = rect((30, 30), 8, 22, 8, 22)  # object + the whole band: errors only in the band
    assert next_click(gt, pred, ignore) is None
    assert iou(pred, gt, ignore) == 1.0
    assert iou(pred, gt) == pytest.approx(100 / 196)
    # a false region that crosses the band: only its part outside the band counts and is clicked
    pred2 = gt | rect((30, 30), 15, 30, 15, 30)
    click = next_click(gt, pred2, ignore)
    assert not click.positive and not ignore[click.y, click.x] and not gt[click.y, click.x]
    valid_false = pred2 & ~gt & ~ignore
    assert valid_false[click.y, click.x]


def test_first_click_avoids_ignored_pixels():
    gt = rect((20, 20), 2, 18, 2, 18)
    ignore = rect((20, 20), 6, 14, 6, 14)  # the centre is ignored
    click = first_click(gt, ignore)
    assert not ignore[click.y, click.x] and gt[click.y, click.x]


def test_iou_by_hand():
    gt = rect((10, 10), 0, 4, 0, 4)  # 16
    pred = rect((10, 10), 2, 6, 2, 6)  # 16, overlap 4
    assert iou(pred, gt) == pytest.approx(4 / 28)
    assert iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(ValueError):
        iou(np.zeros((3, 3)), np.zeros((3, 4)))


def test_noc_and_curves():
    assert noc([0.5, 0.86, 0.95], 0.85, 20) == 2
    assert noc([0.5, 0.86, 0.95], 0.90, 20) == 3
    assert noc([0.5, 0.6], 0.85, 20) == 20
    assert noc([0.9], 0.85, 1) == 1
    curves = [[0.5, 0.9], [1.0]]
    assert mean_curve(curves, 3).tolist() == pytest.approx([0.75, 0.95, 0.95])
    assert miou_at(curves, 2) == pytest.approx(0.95)
    summary = interactive_summary(curves, 3)
    assert summary["NoC@85"] == pytest.approx(1.5) and summary["NoC@90"] == pytest.approx(1.5)
    assert summary["NoF@90"] == 0 and summary["mIoU@k"]["1"] == pytest.approx(0.75)
