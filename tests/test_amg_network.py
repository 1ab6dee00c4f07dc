"""Everything mode through the network on the tiny fixture checkpoint, against the released generator."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import segany
from segany.io import rle as rle_io
from segany.engine.sam import low_res_region
from segany.predict.amg import AmgSettings, MaskGenerator, SamMaskSource

from .conftest import REFERENCE, case_image_path, import_reference, load_rgb, needs_shared

pytestmark = needs_shared

# Random weights give small logits (|logit| < ~1) and predicted IoUs around 0.1: thresholds are lowered
# so that masks survive, and box NMS is switched off (threshold 1) so that every mask is compared.
SETTINGS = dict(
    points_per_side=4,
    pred_iou_thresh=0.05,
    stability_score_thresh=0.5,
    stability_score_offset=0.02,
    box_nms_thresh=1.0,
)


@pytest.fixture(scope="module")
def reference_model():
    import_reference("segment_anything")
    from segment_anything.build_sam import _build_sam

    model = _build_sam(
        encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=2, encoder_global_attn_indexes=[1], checkpoint=None
    )
    state = torch.load(REFERENCE / "sam_vit_small.pth", map_location="cpu")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _image():
    return load_rgb(case_image_path("davis345_000"))


def test_filtered_decoding_equals_full_decode(fixture_sam):
    source = SamMaskSource(fixture_sam)
    assert callable(source.predict_above)
    image = load_rgb(case_image_path("synthetic_97x61"))
    h, w = image.shape[:2]
    source.set_crop(image)
    points = np.random.default_rng(0).random((7, 2)) * [w, h]
    low, iou = source.predict(points)
    # about half the outputs pass; a threshold between two well-separated values, not at a tie
    values = iou.flatten().sort().values
    gaps = [k for k in range(len(values) - 1) if values[k + 1] - values[k] > 1e-4]
    k = min(gaps, key=lambda k: abs(k - len(values) // 2))
    threshold = float(values[k] + values[k + 1]) / 2
    iou_first, index, logits = source.predict_above(points, threshold)
    torch.testing.assert_close(iou_first, iou, rtol=0, atol=1e-6)
    expected_index = torch.nonzero(iou.flatten() > threshold).flatten()
    assert 0 < len(index) < iou.numel() and torch.equal(index, expected_index)
    # Only the low-res rows and columns that upscale() reads are computed (the crop's padding is zero).
    _, _, need_h, need_w = low_res_region(low.shape[-2:], fixture_sam.image_size, source.embedding.input_size)
    assert need_h < low.shape[-2]  # a landscape crop: padding rows
    expected_low = low.flatten(0, 1)[index]
    torch.testing.assert_close(logits[..., :need_h, :need_w], expected_low[..., :need_h, :need_w], rtol=0, atol=1e-5)
    assert not logits[..., -4:, :].any()
    torch.testing.assert_close(source.upscale(logits), source.upscale(expected_low), rtol=0, atol=1e-5)
    iou_all, index_all, logits_all = source.predict_above(points, 0.0)  # threshold <= 0: every output
    assert torch.equal(index_all, torch.arange(21))
    torch.testing.assert_close(source.upscale(logits_all), source.upscale(low.flatten(0, 1)), rtol=0, atol=1e-5)
    full = source.upscale(low[:, 0])
    assert full.shape == (7, h, w)
    expected = fixture_sam.postprocess_masks(low[:, :1], source.embedding.input_size, (h, w))[:, 0]
    torch.testing.assert_close(full, expected)


def _match(ours, ref):
    ours_m = np.stack([np.asarray(a["segmentation"]) for a in ours]).reshape(len(ours), -1)
    ref_m = np.stack([rle_io.decode(a["segmentation"]) for a in ref]).reshape(len(ref), -1)
    # pair by (point, predicted IoU) - unique per mask - then compare the masks
    pairs = []
    for i, a in enumerate(ours):
        j = min(
            range(len(ref)),
            key=lambda j: np.abs(np.subtract(a["point_coords"], ref[j]["point_coords"])).sum()
            + abs(a["predicted_iou"] - ref[j]["predicted_iou"]),
        )
        inter = np.logical_and(ours_m[i], ref_m[j]).sum()
        union = np.logical_or(ours_m[i], ref_m[j]).sum()
        pairs.append((i, j, inter / max(union, 1)))
    return pairs


def test_matches_reference_generator(fixture_sam, reference_model):
    import_reference("segment_anything")
    from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator

    image = _image()
    ref = ReferenceGenerator(reference_model, output_mode="uncompressed_rle", **SETTINGS).generate(image)
    ours = segany.SamAutomaticMaskGenerator(fixture_sam, **SETTINGS).generate(image)
    assert len(ref) > 5
    assert len(ours) == len(ref)
    pairs = _match(ours, ref)
    assert len({j for _, j, _ in pairs}) == len(ref)
    for i, j, iou in pairs:
        a, b = ours[i], ref[j]
        assert iou >= 0.999
        assert a["segmentation"].dtype == bool and a["segmentation"].shape == image.shape[:2]
        np.testing.assert_allclose(a["predicted_iou"], b["predicted_iou"], rtol=1e-4)
        np.testing.assert_allclose(a["stability_score"], b["stability_score"], rtol=1e-3)
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1)
        np.testing.assert_allclose(a["crop_box"], b["crop_box"])
        np.testing.assert_allclose(a["point_coords"], b["point_coords"])
        assert abs(a["area"] - b["area"]) <= max(2, 1e-3 * b["area"])


def test_network_output_modes(fixture_sam):
    gen = MaskGenerator(fixture_sam, AmgSettings(**dict(SETTINGS, points_per_side=3)))
    image = load_rgb(case_image_path("synthetic_97x61"))
    records = gen.generate_records(image)
    assert len(records) > 0
    binary = records.to_annotations("binary_mask")
    plain = records.to_annotations("uncompressed_rle")
    coco = records.to_annotations("coco_rle")
    for b, u, c in zip(binary, plain, coco):
        assert b["segmentation"].shape == image.shape[:2]
        assert np.array_equal(rle_io.decode(u["segmentation"]), b["segmentation"])
        assert np.array_equal(rle_io.decode(c["segmentation"]), b["segmentation"])
        assert b["area"] == int(b["segmentation"].sum()) == rle_io.area(c["segmentation"])
        x, y, w, h = b["bbox"]
        ys, xs = np.nonzero(b["segmentation"])
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())


@pytest.mark.heavy
def test_matches_reference_generator_with_crops(fixture_sam, reference_model):
    import_reference("segment_anything")
    from segment_anything import SamAutomaticMaskGenerator as ReferenceGenerator

    settings = dict(SETTINGS, crop_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=200,
                    box_nms_thresh=0.9, crop_nms_thresh=0.9)
    image = _image()
    ref = ReferenceGenerator(reference_model, output_mode="uncompressed_rle", **settings).generate(image)
    ours = segany.SamAutomaticMaskGenerator(fixture_sam, **settings).generate(image)
    assert len(ours) == len(ref) > 0
    for i, j, iou in _match(ours, ref):
        assert iou >= 0.999
        np.testing.assert_allclose(ours[i]["crop_box"], ref[j]["crop_box"])
