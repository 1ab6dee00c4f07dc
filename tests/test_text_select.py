"""Text selection: crops, ranking and negatives, with a stand-in scorer whose answer is known."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segany.io import rle as rle_io
from segany.predict.text_select import (
    CLIP_MEAN,
    CLIP_STD,
    ClipScorer,
    mask_crops,
    score_masks,
    select_by_text,
)

from .conftest import DATASETS, REFERENCE, load_rgb

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def colour_direction(rgb) -> np.ndarray:
    v = (np.asarray(rgb, dtype=np.float64) / 255 - CLIP_MEAN) / CLIP_STD
    return v / np.linalg.norm(v)


class ColourScorer:
    """Stand-in for CLIP: a crop's embedding is its mean (normalised) colour, a phrase's the colour it
    names; so the best mask for "red" is the one whose pixels deviate most towards red."""

    image_size = 64

    def __init__(self) -> None:
        self.seen_images = 0

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.seen_images += pixels.shape[0]
        return torch.nn.functional.normalize(pixels.mean(dim=(2, 3)), dim=-1)

    def embed_texts(self, texts):
        return torch.tensor(np.stack([colour_direction(COLOURS[t]) for t in texts]), dtype=torch.float32)


def expected_cosine(image: np.ndarray, mask: np.ndarray, colour: str) -> float:
    mean = (image[mask].astype(np.float64) / 255 - CLIP_MEAN) / CLIP_STD
    mean = mean.mean(0)
    return float(mean @ colour_direction(COLOURS[colour]) / np.linalg.norm(mean))


def real_case(name: str):
    path = REFERENCE / f"analytic__{name}__amg.json"
    if not path.is_file():
        pytest.skip("../shared/fixtures/reference is absent")
    data = json.loads(path.read_text())
    dataset, image_id = name.rsplit("_", 1)
    image = load_rgb(next((DATASETS / dataset / "images").glob(f"{image_id}.*")))
    masks = [rle_io.decode(a["segmentation"]) for a in data["annotations"]]
    gt = next((DATASETS / dataset / "masks").glob(f"{image_id}.*"))
    masks.append(load_rgb(gt)[..., 0] > 0)  # the dataset's object mask as one more candidate
    return image, masks


@pytest.mark.parametrize("name", ["grabcut_124080", "davis345_000"])
@pytest.mark.parametrize("colour", ["red", "green", "blue", "yellow"])
def test_known_winner_on_real_everything_masks(name, colour):
    image, masks = real_case(name)
    expected = np.array([expected_cosine(image, m, colour) for m in masks])
    scorer = ColourScorer()
    matches = select_by_text(image, masks, colour, scorer, top_k=3)
    assert scorer.seen_images == len(masks)
    assert [m.phrase for m in matches] == [colour] * 3
    assert matches[0].score >= matches[1].score >= matches[2].score
    order = np.argsort(-expected)
    best = expected[order[0]]
    # the crops are resized, so near-ties may swap; a clear winner must win
    assert matches[0].index == order[0] or best - expected[matches[0].index] < 0.02
    if best - expected[order[1]] > 0.05:
        assert matches[0].index == order[0]
    scores, _ = score_masks(image, masks, colour, scorer)
    assert np.corrcoef(scores[0], expected)[0, 1] > 0.95


def test_blanked_crop_beats_box_crop():
    """A blue ring around a bright red neighbour, and a small brownish object: the box crop of the ring
    is mostly the neighbour, so "red" picks the ring; the blanked crop sees the ring's own pixels."""
    image = np.full((200, 300, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[:200, :300]
    r = np.hypot(yy - 100, xx - 100)
    ring = (r >= 70) & (r < 80)
    neighbour = r < 68
    image[ring] = (20, 40, 230)
    image[neighbour] = (250, 10, 10)
    small = (np.abs(yy - 100) < 15) & (np.abs(xx - 250) < 15)
    image[small] = (170, 110, 60)  # brownish: red-leaning, far less than the neighbour
    masks = np.stack([ring, small])
    assert select_by_text(image, masks, "red", ColourScorer(), crop="box")[0].index == 0  # the failure
    assert select_by_text(image, masks, "red", ColourScorer())[0].index == 1  # masked (default) is right


def test_several_phrases_negatives_and_empty_masks():
    image = np.zeros((50, 80, 3), dtype=np.uint8)
    image[:, :40] = (230, 20, 20)
    image[:, 40:] = (20, 20, 230)
    left = np.zeros((50, 80), bool)
    left[:, :40] = True
    masks = [left, ~left, np.zeros((50, 80), bool)]
    matches = select_by_text(image, masks, ["red", "blue"], ColourScorer(), top_k=5)
    assert [(m.phrase, m.index) for m in matches] == [("red", 0), ("red", 1), ("blue", 1), ("blue", 0)]
    plain, _ = score_masks(image, masks, "red", ColourScorer())
    neg, sims = score_masks(image, masks, "red", ColourScorer(), negative=["blue", "green"])
    assert np.isneginf(plain[0, 2]) and np.isneginf(neg[0, 2])
    np.testing.assert_allclose(sims[0, :2], plain[0, :2], rtol=1e-6)
    scorer = ColourScorer()
    texts = scorer.embed_texts(["red", "blue", "green"]).numpy()
    imgs = scorer.embed_images(mask_crops(image, np.stack(masks[:2]), 64)).numpy()
    want = texts[0] @ imgs.T - (texts[1:] @ imgs.T).max(0)
    np.testing.assert_allclose(neg[0, :2], want, rtol=1e-5, atol=1e-6)


def test_crop_preprocessing_matches_clip_resize_and_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 170, 3), dtype=np.uint8)
    mask = np.zeros((90, 170), bool)
    mask[10:70, 20:150] = True
    pixels = mask_crops(image, mask[None], 32)
    from PIL import Image

    crop = Image.fromarray(image[10:70, 20:150]).resize((int(32 * 130 / 60), 32), Image.BICUBIC)
    left = int(round((crop.width - 32) / 2))
    want = (np.asarray(crop)[:, left : left + 32] / 255.0 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(pixels[0].permute(1, 2, 0).numpy(), want, atol=1e-5)


def test_clip_scorer_is_cosine_of_clip_embeddings():
    from segany.modeling.clip import CLIP, ClipConfig, ClipTextConfig, ClipVisionConfig
    from segany.text import tokenize

    torch.manual_seed(0)
    model = CLIP(ClipConfig(32, ClipVisionConfig(64, 16, 64, 1, 1), ClipTextConfig(77, 49408, 64, 1, 1))).eval()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    masks = np.zeros((3, 80, 120), bool)
    masks[0, :40], masks[1, 40:, :60], masks[2, 10:70, 70:] = True, True, True
    scores, _ = score_masks(image, masks, ["a dog", "a cat"], ClipScorer(model, batch_size=2))
    with torch.no_grad():
        img = model.encode_image(mask_crops(image, masks, 64), normalize=True)
        txt = model.encode_text(tokenize(["a dog", "a cat"]), normalize=True)
    np.testing.assert_allclose(scores, (txt @ img.T).numpy(), rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_clear_error():
    image = np.zeros((10, 10, 3), np.uint8)
    masks = np.ones((1, 10, 10), bool)
    for text, match in [("", "empty"), ("   ", "empty"), ([], "at least one"), ("x" * 301, "at most 300")]:
        with pytest.raises(ValueError, match=match):
            select_by_text(image, masks, text, ColourScorer())
    with pytest.raises(ValueError, match="need a CLIP model"):
        select_by_text(image, masks, "red", None)
    with pytest.raises(ValueError, match="not a CLIP model"):
        select_by_text(image, masks, "red", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shape"):
        select_by_text(image, np.ones((1, 9, 10), bool), "red", ColourScorer())
    with pytest.raises(ValueError, match="top_k"):
        select_by_text(image, masks, "red", ColourScorer(), top_k=0)
