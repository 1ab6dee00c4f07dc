"""Semantic-SAM against the reference's outputs in ../shared/fixtures/semantic_sam (a small random-weight
configuration of the released architecture), and the released Swin-T / Swin-L key layouts."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segany.modeling.semantic_sam import LEVEL_TO_TOKEN, LEVELS

from .conftest import DATASETS, SHARED

FIXTURES = SHARED / "fixtures" / "semantic_sam"
CHECKPOINT = FIXTURES / "semantic_sam_mini_seed0.pth"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "manifest.json").is_file(), reason="../shared/fixtures/semantic_sam is absent"
)
TOKEN_TO_LEVEL = {t: level for level, t in LEVEL_TO_TOKEN.items()}


def logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
    excess = np.abs(ours - ref) - (1e-3 + 1e-4 * np.abs(ref))
    assert excess.max() <= 0, f"logits differ by up to {np.abs(ours - ref).max():.3g}"


def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


def unpack(npz, key: str) -> np.ndarray:
    return np.unpackbits(npz[key], axis=-1, count=int(npz[key + "_shape"][-1])).astype(bool).reshape(npz[key + "_shape"])


@pytest.fixture(scope="module")
def model():
    if not CHECKPOINT.is_file():
        pytest.skip("../shared/fixtures/semantic_sam is absent")
    import segany

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return segany.load_model(CHECKPOINT)


_predictors: dict = {}


def predictor_for(model, image: str):
    """A predictor on the exact resized image of the fixture (so the model frame is the image's)."""
    if image not in _predictors:
        import segany

        p = segany.SamPredictor(model)
        p.set_image(np.load(FIXTURES / f"ssam_mini__{image}__input.npz")["image_resized"])
        _predictors[image] = p
    return _predictors[image]


def click_cases(image: str):
    return [c for c in manifest()["cases"] if c.get("kind") == "click" and c["image"] == image] if (
        FIXTURES / "manifest.json").is_file() else []


@needs_fixtures
def test_checkpoint_loads_strictly_and_infers_the_mini_config(model):
    cfg = model.cfg
    assert cfg.swin.embed_dim == 32 and cfg.swin.depths == (2, 2, 2, 2) and cfg.swin.window_size == 7
    assert cfg.pixel_decoder.encoder_layers == 2 and cfg.decoder.num_layers == 3
    assert cfg.decoder.num_mask_tokens == 6 and cfg.size_name == "custom"
    assert len(model.state_dict()) == manifest()["model"]["n_keys"]


@needs_fixtures
def test_image_features_match_the_reference(model):
    inp = np.load(FIXTURES / "ssam_mini__grabcut_124080__input.npz")
    image = torch.from_numpy(inp["image_resized"]).permute(2, 0, 1)
    with torch.no_grad():
        x = model.preprocess(image)
        res = model.backbone(x)
        mask_features, levels = model.sem_seg_head.pixel_decoder(res)
    named = {"input_tensor": x, **{f"backbone_{k}": v for k, v in res.items()}, "mask_features": mask_features}
    named.update({f"msf{i}": t for i, t in enumerate(levels)})
    for name, tensor in named.items():
        if name + "_shape" in inp:
            assert tuple(tensor.shape) == tuple(inp[name + "_shape"]), name
        step = int(inp[name + "_sample_step"])
        sample = tensor.reshape(-1)[::step].numpy()
        np.testing.assert_allclose(sample, inp[name + "_sample"], atol=1e-4, rtol=1e-4, err_msg=name)


@needs_fixtures
@pytest.mark.parametrize("case", click_cases("grabcut_124080") + [
    pytest.param(c, marks=pytest.mark.heavy) for c in click_cases("davis345_000")], ids=lambda c: f"{c['image']}-{c['name']}")
def test_click_six_levels_match_the_reference(model, case):
    ref = np.load(FIXTURES / case["file"])
    p = predictor_for(model, case["image"])
    h, w = p.original_size
    x, y = ref["point"]
    # the predictor takes pixels; the reference's relative click is exactly x_pixels / W
    masks, scores, lowres = p.predict(point_coords=[[x * w, y * h]], return_logits=True)
    tokens = [LEVEL_TO_TOKEN[level] for level in LEVELS]
    assert masks.shape == (6, h, w)
    logits_close(lowres, ref["lowres_logits"][tokens])
    np.testing.assert_allclose(scores, ref["ious"][tokens], atol=1e-4)
    logits_close(masks[:, ::7, ::7], ref["logits_at_sample"][tokens])
    ref_masks = unpack(ref, "masks")[tokens]
    sure = np.abs(masks) > 2e-3
    assert ((masks > 0) == ref_masks)[sure].all()
    # one level, and the per-layer outputs of the decoder
    one, one_score, _ = p.predict(point_coords=[[x * w, y * h]], granularity=3)
    assert one.shape == (1, h, w) and one_score[0] == pytest.approx(scores[2])
    with torch.no_grad():
        out = model.decode(p.image.features, torch.tensor([[x, y]], dtype=torch.float64))
    np.testing.assert_allclose(out.ious_per_layer[:, 0, 0].numpy(), ref["ious_per_layer"], atol=1e-4)
    np.testing.assert_allclose(out.boxes_per_layer[:, 0].numpy(), ref["pred_boxes_per_layer"], atol=1e-5)


@needs_fixtures
@pytest.mark.parametrize("case", click_cases("grabcut_124080"), ids=lambda c: c["name"])
@pytest.mark.parametrize("variant", ["default", "median"])
def test_predictor_filtering_keeps_the_same_levels(model, case, variant):
    ref = np.load(FIXTURES / case["file"])
    settings = case[f"predictor_{variant}"]
    p = predictor_for(model, case["image"])
    h, w = p.original_size
    x, y = ref["point"]
    got = p.predict_filtered([[x * w, y * h]], iou_floor=settings["thresh"], hole_area=settings["hole_scale"],
                             island_area=settings["island_scale"])
    assert got.levels == [TOKEN_TO_LEVEL[t] for t in settings["token_order"]]
    assert got.scores_rounded == settings["ious_rounded"]
    assert got.area_order == settings["area_order"]
    np.testing.assert_allclose(got.areas, settings["areas"], atol=20)
    drawn = unpack(ref, f"pred_{variant}_masks")
    assert drawn.shape == got.masks.shape
    assert (drawn != got.masks).sum() <= 50 * len(got.levels)


@needs_fixtures
def test_resize_matches_the_reference_bytes():
    from segany.predict.inputs import load_image
    from segany.predict.semantic_sam_predictor import resize_short_edge

    for name, info in manifest()["images"].items():
        source = FIXTURES / info["source"]
        if not source.is_file():
            continue
        resized = resize_short_edge(load_image(source), 640)
        assert list(resized.shape[:2]) == info["resized_hw"]
        assert hashlib.sha256(resized.tobytes()).hexdigest() == info["resized_sha256"], name


@needs_fixtures
def test_bad_input_one_clear_message(model):
    import segany

    p = predictor_for(model, "grabcut_124080")
    with pytest.raises(ValueError, match="granularity level must be an integer from 1 to 6"):
        p.predict(point_coords=[[10, 10]], granularity=7)
    with pytest.raises(ValueError, match="outside the image"):
        p.predict(point_coords=[[-5, 10]])
    with pytest.raises(ValueError, match="one click"):
        p.predict(point_coords=[[1, 2], [3, 4]])
    assert isinstance(segany.SamPredictor(model), type(p))


def amg_cases(default=("ssam_mini__synthetic_shapes_512x384__amg_level3_nonms.json",)):
    if not (FIXTURES / "manifest.json").is_file():
        return []
    out = []
    for c in manifest()["cases"]:
        if c.get("kind") == "click":
            continue
        marks = [] if c["file"] in default else [pytest.mark.heavy]
        out.append(pytest.param(c, marks=marks, id=Path(c["file"]).stem))
    return out


@needs_fixtures
@pytest.mark.parametrize("case", amg_cases())
def test_automatic_generation_gives_the_reference_records(model, case):
    from segany.io import rle as rle_io
    from segany.predict.semantic_sam_amg import SemanticSamAutomaticMaskGenerator

    ref = json.loads((FIXTURES / case["file"]).read_text())
    params = dict(ref["params"])
    levels = params.pop("level")
    image = np.load(FIXTURES / f"ssam_mini__{case['image']}__input.npz")["image_resized"]
    gen = SemanticSamAutomaticMaskGenerator(model, level=levels, **params)
    got = gen.generate(image)
    want = ref["annotations"]
    assert len(got) == len(want)
    h, w = image.shape[:2]
    for ours, theirs in zip(got, want):
        assert ours["segmentation"]["size"] == theirs["segmentation"]["size"] == [h, w]
        np.testing.assert_allclose(np.array(ours["point_coords"][0]) / [w, h], theirs["point_coords"][0][:2], atol=1e-6)
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], atol=1)
        a = rle_io.decode(ours["segmentation"])
        b = rle_io.decode(theirs["segmentation"])
        assert (a & b).sum() / max((a | b).sum(), 1) >= 0.999
        assert abs(ours["area"] - theirs["area"]) <= 1e-3 * theirs["area"] + 1
        assert ours["predicted_iou"] == pytest.approx(theirs["predicted_iou"], abs=1e-4)
        assert ours["stability_score"] == pytest.approx(theirs["stability_score"], abs=1e-3)
        assert ours["crop_box"] == theirs["crop_box"]
