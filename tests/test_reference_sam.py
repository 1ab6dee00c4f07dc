"""segany against the released segment_anything outputs on the seeded fixture checkpoint."""
from __future__ import annotations

import numpy as np
import pytest

import segany

from .conftest import REFERENCE, case_image_path, load_rgb, manifest, needs_shared

pytestmark = needs_shared

LOGIT_TOL = 1e-4
IOU_TOL = 1e-5


def _cases(model_name: str):
    if not (REFERENCE / "manifest.json").is_file():
        return []
    return [c for c in manifest()["cases"] if c.get("model") == model_name]


def run_case(predictor, case: dict):
    """Feed one manifest case to a predictor; returns (full-res logits, iou, low-res logits)."""
    kwargs = {}
    if "point_coords" in case:
        kwargs["point_coords"] = np.array(case["point_coords"])
        kwargs["point_labels"] = np.array(case["point_labels"])
    if "box" in case:
        kwargs["box"] = np.array(case["box"])
    if "boxes" in case:
        kwargs["box"] = np.array(case["boxes"])
    if "mask_input_from" in case:
        previous = np.load(REFERENCE / case["file"].replace(case["name"], case["mask_input_from"]))
        best = int(np.argmax(previous["iou_predictions"]))
        kwargs["mask_input"] = previous["low_res_logits"][best][None]
    return predictor.predict(multimask_output=case["multimask_output"], return_logits=True, **kwargs)


def check_case(predictor, case: dict) -> None:
    ref = np.load(REFERENCE / case["file"])
    logits, iou, low_res = run_case(predictor, case)
    assert low_res.shape == ref["low_res_logits"].shape
    np.testing.assert_allclose(low_res, ref["low_res_logits"], atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(iou, ref["iou_predictions"], atol=IOU_TOL, rtol=0)
    if "logits_at_sample" in ref:
        sampled = logits[..., ::7, ::7]
        np.testing.assert_allclose(sampled, ref["logits_at_sample"], atol=LOGIT_TOL, rtol=0)
    shape = tuple(ref["masks_shape"])
    ref_masks = np.unpackbits(ref["masks"], axis=-1, count=shape[-1]).astype(bool).reshape(shape)
    assert logits.shape == shape
    confident = np.abs(logits) > 1e-3
    np.testing.assert_array_equal((logits > 0)[confident], ref_masks[confident])


@pytest.fixture(scope="module")
def predictors(fixture_sam):
    cache = {}

    def get(image_name: str):
        if image_name not in cache:
            predictor = segany.SamPredictor(fixture_sam)
            predictor.set_image(load_rgb(case_image_path(image_name)))
            cache[image_name] = predictor
        return cache[image_name]

    return get


@pytest.mark.parametrize("case", _cases("sam_vit_small"), ids=lambda c: f"{c['image']}-{c['name']}")
def test_sam_vit_small_case(predictors, case):
    check_case(predictors(case["image"]), case)


def test_image_embedding_matches(predictors):
    expected = np.load(REFERENCE / "sam_vit_small__davis345_000__embedding.npy")
    got = predictors("davis345_000").get_image_embedding().numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_architecture_inferred_from_state_dict(fixture_sam):
    enc = fixture_sam.config.encoder
    assert (enc.embed_dim, enc.depth, enc.num_heads) == (96, 2, 2)
    assert tuple(enc.global_attn_indexes) == (1,)
    assert enc.window_size == 14 and enc.img_size == 1024
