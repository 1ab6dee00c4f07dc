"""Masks <-> polygons with holes."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segany.io.polygons import has_holes, mask_to_polygons, polygons_to_mask, to_coco_polygons

from .test_rle import coco_sample


def ring_with_island():
    m = np.zeros((40, 50), bool)
    m[5:35, 5:45] = True
    m[10:30, 10:40] = False  # hole
    m[15:25, 20:30] = True  # island inside the hole
    m[0, 49] = True  # single pixel
    m[38:40, 0:10] = True  # thin bar
    return m


def test_holes_and_islands_round_trip_exactly():
    m = ring_with_island()
    polys = mask_to_polygons(m)
    assert has_holes(polys)
    assert len(polys) == 4
    assert np.array_equal(polygons_to_mask(polys, *m.shape), m)


@pytest.mark.parametrize("mask", [np.zeros((4, 4), bool), np.ones((3, 5), bool)])
def test_empty_and_full(mask):
    polys = mask_to_polygons(mask)
    assert np.array_equal(polygons_to_mask(polys, *mask.shape), mask)


def test_coco_masks_exact_and_simplified():
    for m in coco_sample(40):
        exact = mask_to_polygons(m)
        assert np.array_equal(polygons_to_mask(exact, *m.shape), m)
        simple = mask_to_polygons(m, tolerance=1.0)
        assert sum(len(p["exterior"]) for p in simple) <= sum(len(p["exterior"]) for p in exact)
        back = polygons_to_mask(simple, *m.shape)
        if m.sum() > 400:
            assert (back & m).sum() / (back | m).sum() > 0.8


def test_coco_polygons_read_by_pycocotools():
    # pycocotools rasterises polygons through pixel centres a little inside the boundary pixels
    for m in coco_sample(30):
        polys = mask_to_polygons(m, tolerance=0.0)
        if not polys or has_holes(polys) or m.sum() < 500:
            continue
        h, w = m.shape
        coco = to_coco_polygons(polys)
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in coco)
        back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(coco, h, w))).astype(bool)
        assert (back & m).sum() / (back | m).sum() > 0.8


def test_bad_input():
    with pytest.raises(ValueError):
        mask_to_polygons(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError):
        mask_to_polygons(np.zeros((2, 2)), tolerance=-1)
