"""Training data: the three sources, the annotation tool's COCO/RLE export, aligned augmentation,
deterministic sampling."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from segany.train.data import (
    AugmentConfig,
    EpochSampler,
    InstanceDataset,
    augment,
    coco_records,
    folder_records,
    parse_data_spec,
    sa1b_records,
)


def scene(h=60, w=90):
    """An image with a red rectangle and a green disc, and their masks."""
    img = np.full((h, w, 3), 40, np.uint8)
    rect = np.zeros((h, w), bool)
    rect[10:30, 15:50] = True
    yy, xx = np.mgrid[:h, :w]
    disc = (xx - 65) ** 2 + (yy - 40) ** 2 < 12**2
    img[rect] = (230, 20, 20)
    img[disc] = (20, 230, 20)
    return img, np.stack([rect, disc])


def write_coco(tmp_path, img, masks, style):
    Image.fromarray(img).save(tmp_path / "a.png")
    anns = []
    for i, m in enumerate(masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        if style == "rle":
            seg = {"size": rle["size"], "counts": rle["counts"].decode()}
        elif style == "uncompressed":
            flat = m.T.flatten().astype(np.uint8)  # column-major runs, starting with zeros
            changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
            counts = np.diff(np.concatenate([[0], changes])).tolist()
            seg = {"size": list(m.shape), "counts": counts[: len(counts)]}
        else:  # polygon of the rectangle's outline (exact for an axis-aligned box)
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            seg = [[float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]]
        anns.append({"id": i + 1, "image_id": 7, "category_id": 1, "segmentation": seg, "area": float(m.sum()),
                     "bbox": [0, 0, 1, 1], "iscrowd": 0})
    data = {"images": [{"id": 7, "file_name": "a.png", "height": img.shape[0], "width": img.shape[1]}],
            "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
    (tmp_path / "export.json").write_text(json.dumps(data))
    return tmp_path / "export.json"


@pytest.mark.parametrize("style", ["rle", "uncompressed"])
def test_coco_rle_export_is_read_exactly(tmp_path, style):
    img, masks = scene()
    path = write_coco(tmp_path, img, masks, style)
    records = parse_data_spec(f"coco:{path}")  # images found beside the JSON, as the tool exports
    assert len(records) == 1
    got = records[0].instance_masks(*img.shape[:2])
    np.testing.assert_array_equal(got, masks)


def test_coco_polygons_and_image_dir(tmp_path):
    img, masks = scene()
    path = write_coco(tmp_path, img, masks[:1], "polygon")
    records = coco_records(path, tmp_path)
    got = records[0].instance_masks(*img.shape[:2])
    assert (got[0] == masks[0]).mean() > 0.99


def test_sa1b_and_folder_sources(tmp_path):
    img, masks = scene()
    Image.fromarray(img).save(tmp_path / "sa_1.jpg")
    anns = [{"segmentation": {"size": list(m.shape), "counts": mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()},
             "area": int(m.sum())} for m in masks]
    (tmp_path / "sa_1.json").write_text(json.dumps({"image": {"file_name": "sa_1.jpg"}, "annotations": anns}))
    records = sa1b_records(tmp_path)
    assert len(records) == 1 and records[0].num_instances() == 2
    np.testing.assert_array_equal(records[0].instance_masks(*img.shape[:2], [1]), masks[1:])

    (tmp_path / "im").mkdir()
    (tmp_path / "ma").mkdir()
    Image.fromarray(img).save(tmp_path / "im" / "x.png")
    label = (masks[0] * 1 + masks[1] * 2).astype(np.uint8)
    Image.fromarray(label).save(tmp_path / "ma" / "x.png")
    records = parse_data_spec(f"folder:{tmp_path / 'im'},{tmp_path / 'ma'}")
    np.testing.assert_array_equal(records[0].instance_masks(*img.shape[:2]), masks)


def test_bad_specs_raise_value_errors(tmp_path):
    for spec in ["nonsense", "coco:", f"coco:{tmp_path / 'missing.json'}", f"folder:{tmp_path}", f"folder:{tmp_path},{tmp_path}"]:
        with pytest.raises(ValueError):
            parse_data_spec(spec)


def test_augmentation_keeps_image_and_masks_aligned():
    img, masks = scene()
    cfg = AugmentConfig(flip=True, scale_range=(0.6, 2.5))
    flips = 0
    for seed in range(30):
        out_img, out_masks = augment(img, masks, 64, cfg, np.random.default_rng(seed))
        assert out_img.shape[:2] == out_masks.shape[1:] and max(out_img.shape[:2]) <= 64
        red = (out_img[..., 0] > 135) & (out_img[..., 1] < 125)
        green = (out_img[..., 1] > 135) & (out_img[..., 0] < 125)
        for color, mask in ((red, out_masks[0]), (green, out_masks[1])):
            if mask.sum() > 20:
                inter, union = (color & mask).sum(), (color | mask).sum()
                assert inter / union > 0.8, seed
        flips += int(out_masks[0][:, : out_masks.shape[2] // 3].sum() < out_masks[0][:, -out_masks.shape[2] // 3 :].sum())
    assert 5 < flips < 25  # the rectangle (left in the original) ends up on the right about half the time


def test_dataset_samples_are_deterministic_and_framed(tmp_path):
    img, masks = scene()
    (tmp_path / "im").mkdir()
    (tmp_path / "ma").mkdir()
    for i in range(3):
        Image.fromarray(img).save(tmp_path / "im" / f"{i}.png")
        Image.fromarray((masks[0] * 1 + masks[1] * 2).astype(np.uint8)).save(tmp_path / "ma" / f"{i}.png")
    ds = InstanceDataset(folder_records(tmp_path / "im", tmp_path / "ma"), 128, max_instances=1,
                         augment_cfg=AugmentConfig(flip=True, scale_range=(0.8, 1.2)), seed=3)
    a, b = ds[(2, 1)], ds[(2, 1)]
    assert a["image"].shape == (3, 128, 128) and a["masks"].shape == (1, 128, 128)
    assert (a["image"] == b["image"]).all() and (a["masks"] == b["masks"]).all()
    h, w = a["size"]
    assert not a["masks"][:, h:, :].any() and not a["masks"][:, :, w:].any()
    plain = InstanceDataset(ds.records, 128, max_instances=5)[0]
    assert plain["size"] == (85, 128) and plain["masks"].shape[0] == 2  # predictor's resize: 60x90 -> 85x128


def test_epoch_sampler_resumes_in_the_same_order():
    full = EpochSampler(5, seed=1)
    it = iter(full)
    order = [next(it) for _ in range(13)]
    assert sorted(i for e, i in order[:5]) == list(range(5)) and order[5][0] == 1
    it = iter(EpochSampler(5, seed=1, start=7))
    assert [next(it) for _ in range(6)] == order[7:13]
