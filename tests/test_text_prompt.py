"""Prompt(text=...) through Segmenter and SamPredictor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import segany
from segany.modeling.clip import CLIP, ClipConfig, ClipTextConfig, ClipVisionConfig
from segany.predict.text_select import select_by_text


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return CLIP(ClipConfig(32, ClipVisionConfig(64, 16, 64, 1, 1), ClipTextConfig(77, 49408, 64, 1, 1))).eval()


def case():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    masks = np.zeros((4, 60, 90), bool)
    masks[0, :30], masks[1, 30:], masks[2, :, :45], masks[3, 10:50, 20:70] = True, True, True, True
    return image, masks


def test_segmenter_text_prompt_matches_select_by_text(tiny_sam, tiny_clip):
    image, masks = case()
    seg = segany.Segmenter(tiny_sam, clip=tiny_clip)
    emb = seg.embed(image)
    prompts = [segany.Prompt(text="a dog", top_k=2), segany.Prompt(points=[[10, 10]], labels=[1]),
               segany.Prompt(text="a cat", negative=["background"], top_k=4)]
    dog, point, cat = seg.segment(emb, prompts, image=image, candidates=masks)
    want = select_by_text(image, masks, "a dog", tiny_clip, top_k=2)
    assert dog.extras["indices"].tolist() == [m.index for m in want]
    np.testing.assert_array_equal(dog.masks, masks[[m.index for m in want]])
    np.testing.assert_allclose(dog.scores, [m.score for m in want], rtol=1e-6)
    assert dog.low_res_logits.shape == (0, 256, 256)
    assert point.masks.shape == (3, 60, 90)  # the point prompt decoded as usual
    want_cat = select_by_text(image, masks, "a cat", tiny_clip, top_k=4, negative=["background"])
    assert cat.extras["indices"].tolist() == [m.index for m in want_cat]


def test_text_prompt_with_everything_mode_candidates(tiny_sam, tiny_clip):
    image, _ = case()
    seg = segany.Segmenter(tiny_sam, clip=tiny_clip)
    # a coarse grid and no thresholds: random weights, and the default suite stays fast
    seg.text_candidate_settings = segany.AmgSettings(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0)
    emb = seg.embed(image)
    pred = seg.segment(emb, segany.Prompt(text="a dog", top_k=3), image=image)
    everything = emb.decoder_cache["everything_masks"]
    assert pred.masks.shape[1:] == (60, 90) and len(pred.masks) == min(3, int(everything.reshape(len(everything), -1).any(1).sum()))
    for mask, index in zip(pred.masks, pred.extras["indices"]):
        np.testing.assert_array_equal(mask, everything[index])


def test_predictor_predict_text(tiny_sam, tiny_clip):
    image, masks = case()
    predictor = segany.SamPredictor(tiny_sam, clip=tiny_clip)
    with pytest.raises(ValueError, match="set_image"):
        predictor.predict_text("a dog")
    predictor.set_image(image)
    got, scores = predictor.predict_text("a dog", top_k=2, candidates=masks)
    want = select_by_text(image, masks, "a dog", tiny_clip, top_k=2)
    np.testing.assert_array_equal(got, masks[[m.index for m in want]])
    assert scores.shape == (2,) and scores[0] >= scores[1]


def test_text_prompt_errors(tiny_sam, tiny_clip):
    image, masks = case()
    seg = segany.Segmenter(tiny_sam)
    emb = seg.embed(image)
    with pytest.raises(ValueError, match="need a CLIP model"):
        seg.segment(emb, segany.Prompt(text="a dog"), image=image, candidates=masks)
    seg = segany.Segmenter(tiny_sam, clip=tiny_clip)
    with pytest.raises(ValueError, match="image=image"):
        seg.segment(emb, segany.Prompt(text="a dog"), candidates=masks)
    with pytest.raises(ValueError, match="empty"):
        seg.segment(emb, segany.Prompt(text="  "), image=image, candidates=masks)
    with pytest.raises(ValueError, match="cannot be combined"):
        seg.segment(emb, segany.Prompt(text="a dog", box=[0, 0, 5, 5]), image=image, candidates=masks)
