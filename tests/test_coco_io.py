"""COCO instances and SA-1B per-image files: write, read back, compare with pycocotools."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from segany.io import coco as coco_io
from segany.io import rle as rle_io
from segany.io import sa1b

from .test_rle import COCO_VAL, coco_sample


def records_from_masks(masks):
    out = []
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())] if len(xs) else [0.0] * 4
        seg = m if i % 3 == 0 else (rle_io.encode(m)[0] if i % 3 == 1 else rle_io.encode_coco(m)[0])
        out.append({"segmentation": seg, "area": int(m.sum()), "bbox": bbox, "predicted_iou": 0.9, "point_coords": [[1.0, 2.0]],
                    "stability_score": 0.95, "crop_box": [0.0, 0.0, float(m.shape[1]), float(m.shape[0])]})
    return out


def same_size_masks():
    masks = [m for m in coco_sample(40)]
    shape = max({m.shape for m in masks}, key=lambda s: sum(m.shape == s for m in masks))
    return [m for m in masks if m.shape == shape]


def test_sa1b_round_trip(tmp_path):
    masks = same_size_masks()
    h, w = masks[0].shape
    path = sa1b.write_sa1b(tmp_path / "a.json", records_from_masks(masks), {"width": w, "height": h, "file_name": "a.jpg"})
    doc = sa1b.read_sa1b(path)
    assert np.array_equal(sa1b.sa1b_masks(doc), np.stack(masks))
    assert [a["area"] for a in doc["annotations"]] == [int(m.sum()) for m in masks]
    assert not list(tmp_path.glob(".*.tmp"))


def test_sa1b_rejects_damaged(tmp_path):
    (tmp_path / "bad.json").write_text('{"image": {"width": 3}')
    with pytest.raises(ValueError):
        sa1b.read_sa1b(tmp_path / "bad.json")
    (tmp_path / "wrong.json").write_text(json.dumps({"image": {"width": 3, "height": 2, "file_name": "x"},
                                                     "annotations": [{"segmentation": {"size": [9, 9], "counts": "1"}}]}))
    with pytest.raises(ValueError):
        sa1b.read_sa1b(tmp_path / "wrong.json")
    with pytest.raises(ValueError):
        sa1b.write_sa1b(tmp_path / "x.json", records_from_masks([np.ones((4, 4), bool)]), {"width": 5, "height": 4, "file_name": "x"})


@pytest.mark.parametrize("polygons", [False, True])
def test_coco_round_trip_with_pycocotools(tmp_path, polygons):
    from pycocotools.coco import COCO

    masks = same_size_masks()
    h, w = masks[0].shape
    doc = coco_io.coco_document()
    coco_io.add_image(doc, "a.jpg", h, w, records_from_masks(masks), polygons=polygons, tolerance=0.0)
    coco_io.add_image(doc, "b.jpg", h, w, records_from_masks(masks[:2]))
    path = coco_io.write_coco(tmp_path / "instances.json", doc)
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO(str(path))
    assert len(api.getImgIds()) == 2 and len(api.getAnnIds()) == len(masks) + 2
    back = coco_io.read_coco(path)
    for ann in back["annotations"][: len(masks)]:
        m = masks[ann["id"] - 1]
        ours = coco_io.annotation_mask(back, ann)
        theirs = api.annToMask(api.anns[ann["id"]]).astype(bool)
        assert np.array_equal(ours, theirs)
        if polygons and isinstance(ann["segmentation"], list):
            assert (ours & m).sum() / (ours | m).sum() > 0.7
        else:
            assert np.array_equal(ours, m)
    merged = coco_io.merge_documents([doc, doc])
    assert len(merged["images"]) == 4 and len({a["id"] for a in merged["annotations"]}) == 2 * len(doc["annotations"])


def test_coco_reader_on_dataset_annotations():
    if not COCO_VAL.is_file():
        pytest.skip("coco-mini absent")
    doc = coco_io.read_coco(COCO_VAL)
    ann = doc["annotations"][0]
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO(str(COCO_VAL))
    assert np.array_equal(coco_io.annotation_mask(doc, ann), api.annToMask(ann).astype(bool))


def test_coco_rejects_damaged(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"images": [], "annotations": [{"image_id": 3}], "categories": []}))
    with pytest.raises(ValueError):
        coco_io.read_coco(tmp_path / "x.json")


def test_records_with_own_ids_categories_and_optional_fields(tmp_path):
    from pycocotools.coco import COCO

    masks = np.zeros((3, 6, 9), bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4:, :] = True
    masks[2, 0, 8] = True
    rles = rle_io.encode_coco(masks)
    records = [{"id": 40 + i, "category_id": 7 if i else 9, "segmentation": r, "score": [0.5, None, 0.25][i]}
               for i, r in enumerate(rles)]
    categories = [{"id": 7, "name": "a", "supercategory": ""}, {"id": 9, "name": "b", "supercategory": ""}]
    doc = coco_io.coco_document(categories, description="d", version="1")
    assert doc["info"] == {"description": "d", "version": "1"}
    assert coco_io.add_image(doc, "x.png", 6, 9, records, image_id=12) == 12
    coco_io.add_image(doc, "y.png", 6, 9, [], image_id=30)
    anns = doc["annotations"]
    assert [a["id"] for a in anns] == [40, 41, 42] and [a["category_id"] for a in anns] == [9, 7, 7]
    assert [a.get("score") for a in anns] == [0.5, None, 0.25] and all("predicted_iou" not in a for a in anns)
    assert [a["area"] for a in anns] == [6, 18, 1] and anns[2]["bbox"] == [8.0, 0.0, 1.0, 1.0]
    path = coco_io.write_coco(tmp_path / "c.json", doc)
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO(str(path))
    assert api.getImgIds() == [12, 30]
    for ann, m in zip(anns, masks):
        assert np.array_equal(api.annToMask(api.anns[ann["id"]]).astype(bool), m)
    # A reader that needs only file names (the server's import) can ask for other image keys.
    named = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [], "categories": []}
    with pytest.raises(ValueError):
        coco_io.validate_coco(named)
    assert coco_io.validate_coco(named, image_keys=("id", "file_name")) is named

    # SA-1B: optional fields are written when present, left out when absent; own ids are kept.
    sa_records = [{"id": 5, "segmentation": rles[0], "bbox": [2, 1, 3, 2], "area": 6, "predicted_iou": 0.5},
                  {"segmentation": masks[1], "bbox": [0, 4, 9, 2], "area": 18, "crop_box": [0, 0, 9, 6], "point_coords": []}]
    sa = sa1b.sa1b_document(sa_records, {"image_id": 3, "width": 9, "height": 6, "file_name": "x.png"})
    assert [a["id"] for a in sa["annotations"]] == [5, 2]
    assert set(sa["annotations"][0]) == {"id", "segmentation", "bbox", "area", "predicted_iou"}
    assert sa["annotations"][1]["crop_box"] == [0.0, 0.0, 9.0, 6.0] and sa["annotations"][1]["point_coords"] == []
    assert np.array_equal(sa1b.sa1b_masks(sa1b.validate_sa1b(sa)), masks[:2])
    with pytest.raises(ValueError):
        sa1b.sa1b_document([dict(sa_records[0], crop_box=[1, 2])], {"width": 9, "height": 6, "file_name": "x.png"})
