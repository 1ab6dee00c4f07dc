"""RLE against pycocotools: COCO masks, random and edge-case masks."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segany.io import rle as rle_io

from .conftest import DATASETS

COCO_VAL = DATASETS / "coco-mini" / "annotations" / "instances_val2017.json"


def coco_sample(n: int = 60):
    if not COCO_VAL.is_file():
        pytest.skip("../shared/datasets/coco-mini is absent")
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(COCO_VAL))
    ids = sorted(coco.getAnnIds())
    pick = np.random.default_rng(0).choice(len(ids), size=min(n, len(ids)), replace=False)
    anns = coco.loadAnns([ids[i] for i in sorted(pick)])
    crowd = [a for a in coco.loadAnns(ids) if a["iscrowd"]][:3]  # RLE-annotated ones too
    return [coco.annToMask(a).astype(bool) for a in anns + crowd]


def edge_masks():
    rng = np.random.default_rng(3)
    out = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.zeros((1, 1), bool), np.ones((1, 1), bool)]
    one = np.zeros((9, 4), bool)
    one[8, 3] = True
    out.append(one)
    first = np.zeros((6, 3), bool)
    first[0, 0] = True
    out.append(first)
    for shape in [(1, 13), (13, 1), (17, 31), (64, 3)]:
        out.append(rng.random(shape) > 0.5)
    return out


def _check_against_pycocotools(mask: np.ndarray):
    ours = rle_io.encode(mask)[0]
    h, w = mask.shape
    assert ours["size"] == [h, w]
    assert sum(ours["counts"]) == h * w
    theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    compressed = rle_io.compress(ours)
    assert compressed["counts"] == theirs["counts"].decode()
    assert np.array_equal(rle_io.decode(ours), mask)
    assert np.array_equal(rle_io.decode(compressed), mask)
    assert rle_io.decompress(compressed) == ours
    assert rle_io.area(ours) == rle_io.area(compressed) == int(mask.sum())
    np.testing.assert_allclose(rle_io.to_bbox(ours), mask_utils.toBbox(theirs))


@pytest.mark.parametrize("index", range(10))
def test_edge_masks(index):
    _check_against_pycocotools(edge_masks()[index])


def test_coco_masks_round_trip():
    masks = coco_sample()
    for m in masks:
        _check_against_pycocotools(m)


def test_batch_encoding_equals_one_by_one():
    rng = np.random.default_rng(5)
    masks = rng.random((12, 23, 19)) > 0.6
    masks[0] = False
    masks[1] = True
    batch = rle_io.encode(masks)
    assert batch == [rle_io.encode(m)[0] for m in masks]
    assert np.array_equal(rle_io.decode_many(batch), masks)
    import torch

    assert rle_io.encode(torch.from_numpy(masks)) == batch
    coco = rle_io.encode_coco(masks)
    assert [c["counts"] for c in coco] == [c["counts"].decode() for c in mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))]


def test_bad_rle_is_a_value_error():
    with pytest.raises(ValueError):
        rle_io.decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError):
        rle_io.decode({"counts": [4]})
    with pytest.raises(ValueError):
        rle_io.encode(np.zeros((2, 2, 2, 2)))


def test_encode_coco_matches_pycocotools_on_noisy_and_degenerate_masks():
    rng = np.random.default_rng(11)
    noisy = np.zeros((3, 48, 85), bool)
    noisy[:, 10:38, 20:65] = True
    noisy ^= rng.random(noisy.shape) < 0.05  # many short runs
    ours = rle_io.encode_coco(noisy)
    theirs = mask_utils.encode(np.asfortranarray(noisy.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in ours] == [r["counts"].decode() for r in theirs]
    assert all(isinstance(r["counts"], str) and r["size"] == [48, 85] for r in ours)
    assert [r["counts"] for r in ours] == [rle_io.compress(r)["counts"] for r in rle_io.encode(noisy)]
    assert rle_io.encode_coco(noisy[1]) == [ours[1]]
    assert rle_io.encode_coco(np.zeros((0, 4, 5), bool)) == []
    for shape in [(0, 3), (3, 0)]:
        empty = rle_io.encode_coco(np.zeros(shape, bool))[0]
        assert empty["size"] == list(shape) and rle_io.area(empty) == 0
    assert [rle_io.to_bbox(r) for r in ours] == [[float(v) for v in b] for b in mask_utils.toBbox(theirs)]
