"""HQ-SAM against the released segment_anything_hq outputs, hq_token_only, and the Light HQ-SAM layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import segany
from segany.io import read_state_dict, save_checkpoint
from segany.modeling.hq_sam import HqSam, MaskDecoderHQ, hq_sam_config

from .conftest import REFERENCE, case_image_path, import_reference, load_rgb, needs_shared
from .test_mobile_sam import _randomise
from .test_reference_sam import _cases, check_case

FIXTURE = REFERENCE / "sam_hq_vit_small.pth"


@pytest.fixture(scope="module")
def hq_sam():
    if not FIXTURE.is_file():
        pytest.skip("../shared/fixtures/reference is absent")
    return segany.load_model(FIXTURE)


@pytest.fixture(scope="module")
def predictors(hq_sam):
    cache = {}

    def get(image_name: str):
        if image_name not in cache:
            predictor = segany.SamPredictor(hq_sam)
            predictor.set_image(load_rgb(case_image_path(image_name)))
            cache[image_name] = predictor
        return cache[image_name]

    return get


@needs_shared
@pytest.mark.parametrize("case", _cases("sam_hq_vit_small"), ids=lambda c: f"{c['image']}-{c['name']}")
def test_hq_sam_case(predictors, case):
    check_case(predictors(case["image"]), case)


@needs_shared
def test_hq_layout_inferred_from_keys(hq_sam):
    assert isinstance(hq_sam, HqSam) and isinstance(hq_sam.mask_decoder, MaskDecoderHQ)
    cfg = hq_sam.config
    assert cfg.variant == "hq" and cfg.encoder_kind == "vit"
    enc = cfg.encoder
    assert (enc.embed_dim, enc.depth, enc.num_heads, tuple(enc.global_attn_indexes)) == (96, 4, 2, (1, 3))


@needs_shared
def test_save_load_round_trip_keeps_released_keys(hq_sam, tmp_path):
    released = read_state_dict(FIXTURE)
    path = save_checkpoint(hq_sam, tmp_path / "sam_hq.pth", dtype=torch.float16)
    saved = read_state_dict(path)
    assert list(saved) == list(released)
    assert all(torch.equal(saved[k], v) for k, v in released.items())
    reloaded = segany.load_model(path)
    assert isinstance(reloaded, HqSam) and reloaded.config == hq_sam.config


def _reference_decoder(package, ours: MaskDecoderHQ, vit_dim: int):
    modeling = package.modeling
    ref = modeling.MaskDecoderHQ(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        vit_dim=vit_dim,
    )
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval()


def _compare_decoders(model, ref_decoder, features, coords, labels, boxes, modes):
    """Our decode() against the reference MaskDecoderHQ for each (multimask_output, hq_token_only)."""
    points = (coords, labels) if coords is not None else None
    sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
    for multimask, hq_only in modes:
        with torch.no_grad():
            low_res, iou = model.decode(features, points, boxes, None, multimask, hq_token_only=hq_only)
            ref_low, ref_iou = ref_decoder(
                image_embeddings=features["image_embeddings"],
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                hq_token_only=hq_only,
                interm_embeddings=[features["interm_embeddings"].permute(0, 2, 3, 1)],
            )
        prompts = coords.shape[0] if coords is not None else boxes.shape[0]
        assert low_res.shape == ref_low.shape == (prompts, 1, 256, 256)
        np.testing.assert_allclose(low_res.numpy(), ref_low.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(iou.numpy(), ref_iou.numpy(), atol=1e-5, rtol=0)


@needs_shared
def test_hq_token_only_matches_reference(predictors, hq_sam):
    """hq_token_only (not in the fixtures) against the reference decoder, on a batch of prompts."""
    package = import_reference("segment_anything_hq")
    ref_decoder = _reference_decoder(package, hq_sam.mask_decoder, vit_dim=96)
    features = predictors("davis345_000").embedding.features
    gen = torch.Generator().manual_seed(11)
    coords = torch.rand(2, 2, 2, generator=gen) * 1000
    labels = torch.tensor([[1, 0], [0, 1]])
    # hq_token_only=False is what every fixture case checks.
    _compare_decoders(hq_sam, ref_decoder, features, coords, labels, None, [(True, True), (False, True)])

    # Through the predictor: the HQ mask alone differs from SAM + HQ.
    predictor = predictors("davis345_000")
    prompt = dict(point_coords=np.array([[50.0, 200.0]]), point_labels=np.array([1]), return_logits=True)
    both, _, _ = predictor.predict(**prompt)
    hq_only, _, _ = predictor.predict(**prompt, hq_token_only=True)
    assert both.shape == hq_only.shape == (1, *predictor.original_size)
    assert not np.allclose(both, hq_only)


@needs_shared
def test_stored_embedding_without_early_features_is_a_clear_error(hq_sam):
    predictor = segany.SamPredictor(hq_sam)
    predictor.set_image_embedding(torch.zeros(1, 256, 64, 64), original_size=(100, 120))
    with pytest.raises(ValueError, match="early image-encoder features"):
        predictor.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1]))


def test_light_hq_sam_on_tiny_vit_matches_reference(tmp_path):
    """Light HQ-SAM (vit_tiny): a reference model with random weights, saved with the released keys,
    loads by keys alone and gives the reference's features and masks."""
    package = import_reference("segment_anything_hq")
    ref = package.sam_model_registry["vit_tiny"]()
    _randomise(ref.image_encoder, seed=5)
    _randomise(ref.mask_decoder, seed=6)
    ref.eval()
    path = save_checkpoint(ref.state_dict(), tmp_path / "sam_hq_vit_tiny.pth")

    model = segany.load_model(path)
    assert isinstance(model, HqSam) and model.config.encoder_kind == "tiny_vit" and model.config.variant == "hq"
    assert model.config == hq_sam_config("vit_tiny")

    image = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_embedding, ref_interm = ref.image_encoder(image)
        features = model.encode(image)
    np.testing.assert_allclose(features["image_embeddings"].numpy(), ref_embedding.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        features["interm_embeddings"].numpy(), ref_interm[0].permute(0, 3, 1, 2).numpy(), atol=1e-4, rtol=0
    )
    boxes = torch.tensor([[100.0, 200.0, 600.0, 700.0], [0.0, 0.0, 1023.0, 511.0]])
    _compare_decoders(model, ref.mask_decoder, features, None, None, boxes, [(True, False), (False, True)])


@needs_shared
def test_forward_and_model_default_take_hq_token_only(hq_sam, predictors):
    """Sam.forward(..., hq_token_only) as released, and the model-wide default used by callers that pass
    no decode options; both agree with the predictor's per-call option."""
    predictor = predictors("davis345_000")
    point = np.array([[60.0, 300.0]])
    expected = {
        flag: predictor.predict(point_coords=point, point_labels=np.array([1]), hq_token_only=flag)[2]
        for flag in (False, True)
    }
    transform = predictor.segmenter.transform  # forward takes the image and points already resized
    transformed = transform.apply_image(load_rgb(case_image_path("davis345_000")))
    record = {
        "image": torch.from_numpy(np.array(transformed)).permute(2, 0, 1).float(),
        "original_size": predictor.original_size,
        "point_coords": torch.as_tensor(transform.apply_coords(point, predictor.original_size))[None].float(),
        "point_labels": torch.tensor([[1]]),
    }
    out = hq_sam([record], multimask_output=True, hq_token_only=True)[0]
    np.testing.assert_allclose(out["low_res_logits"][0].numpy(), expected[True], atol=1e-4, rtol=0)
    assert hq_sam.hq_token_only is False  # restored after the call

    hq_sam.hq_token_only = True
    try:
        default_low = predictor.predict(point_coords=point, point_labels=np.array([1]))[2]
    finally:
        hq_sam.hq_token_only = False
    np.testing.assert_allclose(default_low, expected[True], atol=1e-6, rtol=0)
    assert not np.allclose(expected[True], expected[False])
