"""Everything mode against the released generator's outputs (analytic stand-in predictor) and its
building blocks against the released helpers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segany.io import rle as rle_io
from segany.predict import mask_ops
from segany.predict.amg import AmgSettings, MaskGenerator, MaskSource

from .conftest import REFERENCE, case_image_path, import_reference, load_rgb, needs_shared

COEFFS = (0.04, 0.09, 0.2)


class AnalyticSource:
    """The manifest's `analytic_predictor`: 3 cone-shaped logit maps around each point.

    predict() returns only each mask's parameters (px, py, radius) as a (N, 3, 1, 3) "low-res" map;
    upscale() renders the logits at the crop's resolution for the masks the generator asks for, which
    exercises the lazy-upscaling path of the MaskSource protocol.
    """

    mask_threshold = 0.0

    def __init__(self) -> None:
        self.calls = {"predict": 0, "upscaled": 0}

    def set_crop(self, image: np.ndarray) -> None:
        self.h, self.w = image.shape[:2]

    def predict(self, points: np.ndarray):
        self.calls["predict"] += 1
        side = max(self.h, self.w)
        px, py = points[:, 0], points[:, 1]
        k = np.arange(3, dtype=np.float64)
        # float32 arithmetic where the stand-in that made the fixtures used it
        phase = torch.from_numpy((0.05 * px + 0.03 * py)[:, None] + k[None]).float()
        radius = torch.tensor([side * c for c in COEFFS], dtype=torch.float32)[None] * (1 + 0.5 * torch.sin(phase))
        iou = 0.5 + 0.45 * np.sin((0.013 * px + 0.007 * py)[:, None] + 1.7 * k[None])
        params = torch.stack(
            [torch.from_numpy(px).float()[:, None].expand(-1, 3), torch.from_numpy(py).float()[:, None].expand(-1, 3), radius],
            dim=-1,
        )[:, :, None, :]  # N, 3, 1, 3
        return params, torch.from_numpy(iou).float()

    def upscale(self, params: torch.Tensor) -> torch.Tensor:
        self.calls["upscaled"] += len(params)
        px, py, radius = (params[:, 0, i, None, None] for i in range(3))
        ys = torch.arange(self.h, dtype=torch.float32)[None, :, None]
        xs = torch.arange(self.w, dtype=torch.float32)[None, None, :]
        return 0.5 * (radius - torch.sqrt((xs - px) ** 2 + (ys - py) ** 2))


def amg_cases():
    if not REFERENCE.is_dir():
        return []
    return sorted(p.name for p in REFERENCE.glob("analytic__*__amg.json"))


def mask_iou_matrix(ours, theirs) -> np.ndarray:
    """IoU of every pair of uncompressed RLEs, computed on the RLEs by pycocotools."""
    from pycocotools import mask as mask_utils

    def coco(rles):
        return [dict(rle_io.compress(r), counts=rle_io.compress(r)["counts"].encode()) for r in rles]

    return np.asarray(mask_utils.iou(coco(ours), coco(theirs), [0] * len(theirs))).reshape(len(ours), len(theirs))


@needs_shared
@pytest.mark.parametrize("case_file", amg_cases())
def test_analytic_case_matches_reference(case_file):
    case = json.loads((REFERENCE / case_file).read_text())
    image = load_rgb(case_image_path(case["image"]))
    source = AnalyticSource()
    assert isinstance(source, MaskSource)
    gen = MaskGenerator(source, AmgSettings(**case["params"], output_mode="uncompressed_rle"))
    out = gen.generate(image)
    ref = case["annotations"]
    assert len(out) == len(ref)
    iou = mask_iou_matrix([a["segmentation"] for a in out], [a["segmentation"] for a in ref])
    match = iou.argmax(1)
    assert iou.max(1).min() >= 0.999
    assert len(set(match.tolist())) == len(ref)  # one-to-one
    for i, j in enumerate(match):
        for key in ("bbox", "area", "point_coords", "crop_box", "predicted_iou", "stability_score"):
            np.testing.assert_allclose(np.asarray(out[i][key], float), np.asarray(ref[j][key], float), rtol=1e-4, err_msg=key)
        assert out[i]["segmentation"]["size"] == list(image.shape[:2])
    # Only masks that pass the predicted-IoU threshold were rendered at full resolution.
    n_points = sum(len(g) for g in gen.point_grids)
    assert source.calls["upscaled"] < 3 * n_points * len(mask_ops.generate_crop_boxes(image.shape[:2], gen.settings.crop_n_layers, gen.settings.crop_overlap_ratio)[0])


@needs_shared
def test_analytic_output_modes_agree():
    case = json.loads((REFERENCE / "analytic__synthetic_tall_300x1100__amg.json").read_text())
    image = load_rgb(case_image_path(case["image"]))
    params = dict(case["params"], points_per_side=4)
    results = {m: MaskGenerator(AnalyticSource(), AmgSettings(**params, output_mode=m)).generate(image) for m in
               ("binary_mask", "uncompressed_rle", "coco_rle")}
    n = len(results["binary_mask"])
    assert n > 0 and all(len(r) == n for r in results.values())
    from pycocotools import mask as mask_utils

    for b, u, c in zip(results["binary_mask"], results["uncompressed_rle"], results["coco_rle"]):
        assert b["segmentation"].dtype == bool and b["segmentation"].shape == image.shape[:2]
        assert np.array_equal(rle_io.decode(u["segmentation"]), b["segmentation"])
        assert isinstance(c["segmentation"]["counts"], str)
        coco = dict(c["segmentation"], counts=c["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(coco).astype(bool), b["segmentation"])
        assert b["area"] == int(b["segmentation"].sum())
        json.dumps(c)  # JSON-ready


def test_settings_validation():
    with pytest.raises(ValueError):
        AmgSettings(points_per_side=None).validate()
    with pytest.raises(ValueError):
        AmgSettings(point_grids=[np.zeros((4, 2))]).validate()
    with pytest.raises(ValueError):
        AmgSettings(output_mode="png").validate()
    with pytest.raises(ValueError):
        AmgSettings(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1).validate()
    grids = AmgSettings(points_per_side=None, point_grids=[np.full((3, 2), 0.5)]).validate().layer_grids()
    assert grids[0].shape == (3, 2)


# ----------------------------------------------------------------------------- building blocks vs released


def _ref_amg():
    import_reference("segment_anything")
    from segment_anything.utils import amg as ref_amg

    return ref_amg


@pytest.mark.parametrize("n,layers,factor", [(1, 0, 1), (7, 2, 2), (32, 1, 1), (10, 2, 3)])
def test_point_grids_match_released(n, layers, factor):
    ref = _ref_amg().build_all_layer_point_grids(n, layers, factor)
    ours = mask_ops.build_all_layer_point_grids(n, layers, factor)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("size,layers,ratio", [((480, 854), 1, 512 / 1500), ((321, 481), 2, 0.25), ((1100, 300), 3, 0.4), ((17, 5), 2, 0.0)])
def test_crop_boxes_match_released(size, layers, ratio):
    assert mask_ops.generate_crop_boxes(size, layers, ratio) == _ref_amg().generate_crop_boxes(size, layers, ratio)


def test_masks_to_boxes_match_released():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(rng.random((20, 13, 17)) > 0.97)
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 5, 7] = True
    ref = _ref_amg().batched_mask_to_box(masks)
    assert np.array_equal(mask_ops.masks_to_boxes(masks.numpy()), ref.numpy())
    assert np.array_equal(mask_ops.masks_to_boxes(masks), ref.numpy())


def test_stability_score_matches_released():
    logits = torch.randn(6, 31, 29) * 3
    logits[0] = -5  # empty: NaN as released
    ref = _ref_amg().calculate_stability_score(logits, 0.0, 1.0)
    ours = mask_ops.stability_score(logits, 0.0, 1.0)
    assert np.array_equal(np.isnan(ours), torch.isnan(ref).numpy())
    assert np.array_equal(ours[1:], ref[1:].numpy())


@pytest.mark.parametrize("threshold,offset", [(0.0, 1.0), (0.3, 0.05), (-0.7, 0.1)])
def test_stability_score_on_a_tensor_equals_the_numpy_one(threshold, offset):
    """stability_score_torch (everything mode on a GPU) gives exactly stability_score's values, NaN for
    an empty low-threshold mask included."""
    torch.manual_seed(3)
    logits = torch.randn(7, 33, 41) * 2
    logits[0] = -9.0
    logits[1, :3] = threshold + offset  # on the threshold itself: not above it
    ours = mask_ops.stability_score_torch(logits, threshold, offset)
    numpy_scores = mask_ops.stability_score(logits.numpy(), threshold, offset)
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), numpy_scores)


def test_box_nms_matches_released():
    import_reference("segment_anything")
    from torchvision.ops.boxes import batched_nms  # the reference shim

    rng = np.random.default_rng(1)
    for trial in range(5):
        xy = rng.integers(0, 60, (200, 2))
        wh = rng.integers(1, 40, (200, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        scores = rng.integers(0, 4, 200).astype(np.float32) if trial % 2 else rng.random(200).astype(np.float32)
        ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(200), 0.5).numpy()
        assert np.array_equal(mask_ops.box_nms(boxes, scores, 0.5), ref)
    assert len(mask_ops.box_nms(np.zeros((0, 4)), np.zeros(0), 0.5)) == 0


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_released(mode):
    rng = np.random.default_rng(2)
    for _ in range(5):
        mask = rng.random((40, 50)) > 0.55
        for area in (1, 3, 10, 10_000):
            ref, ref_changed = _ref_amg().remove_small_regions(mask, area, mode)
            ours, changed = mask_ops.remove_small_regions(mask, area, mode)
            assert changed == ref_changed
            assert np.array_equal(ours, ref)
