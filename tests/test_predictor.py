"""The batched and stored-embedding paths of SamPredictor / Segmenter: every batched result must equal
the same prompt run on its own, and a stored embedding must reproduce predict without the encoder."""
from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from segany import Prompt, SamPredictor, Segmenter
from segany.predict.segmenter import ImageEmbedding

from .smallsam import one_thread, small_sam, make_image

ATOL = 1e-5

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model():
    return small_sam(seed=1)


@pytest.fixture(scope="module")
def image():
    return make_image(90, 130, seed=2)


@pytest.fixture(scope="module")
def predictor(model, image):
    p = SamPredictor(model)
    p.set_image(image)
    return p


def assert_same(batched, single, index=None):
    """batched (masks, scores, low_res) at `index` equals a single-prompt (masks, scores, low_res)."""
    bm, bs, bl = batched if index is None else (x[index] for x in batched)
    sm, ss, sl = single
    assert bm.shape == sm.shape and bl.shape == sl.shape
    np.testing.assert_allclose(bs, ss, atol=ATOL, rtol=0)
    np.testing.assert_allclose(bl, sl, atol=ATOL, rtol=0)
    # Masks agree wherever the logit is not within rounding of the threshold.
    assert np.array_equal(bm, sm) or np.mean(bm != sm) < 1e-4


def test_prompts_give_different_results(predictor):
    """Guards the other tests: if every prompt gave the same output, equality would prove nothing."""
    _, s1, l1 = predictor.predict(np.array([[20, 20]]), np.array([1]))
    _, s2, l2 = predictor.predict(np.array([[110, 80]]), np.array([1]))
    assert np.abs(l1 - l2).max() > 1e-2 and np.abs(s1 - s2).max() > 1e-4
    assert l1.std() > 0.1


BOXES = np.array([[5, 5, 60, 50], [40, 30, 125, 88], [0, 0, 130, 90]], dtype=float)
POINT_SETS = np.array([[[20, 30], [60, 40]], [[100, 70], [10, 80]], [[45, 35], [120, 10]]], dtype=float)
POINT_LABELS = np.array([[1, 0], [1, 1], [0, 1]])


@pytest.mark.parametrize("multimask", [True, False])
def test_n_boxes(predictor, multimask):
    out = predictor.predict(box=BOXES, multimask_output=multimask)
    c = 3 if multimask else 1
    assert out[0].shape == (3, c, 90, 130) and out[1].shape == (3, c) and out[2].shape == (3, c, 64, 64)
    for i, b in enumerate(BOXES):
        assert_same(out, predictor.predict(box=b, multimask_output=multimask), i)


def test_n_point_sets(predictor):
    out = predictor.predict(POINT_SETS, POINT_LABELS)
    assert out[0].shape[0] == 3
    for i in range(3):
        assert_same(out, predictor.predict(POINT_SETS[i], POINT_LABELS[i]), i)


def test_one_point_set_shared_with_n_boxes(predictor):
    pts, lbl = np.array([[50, 40]]), np.array([0])
    out = predictor.predict(pts, lbl, box=BOXES)
    for i, b in enumerate(BOXES):
        assert_same(out, predictor.predict(pts, lbl, box=b), i)


def test_n_point_sets_with_n_boxes(predictor):
    out = predictor.predict(POINT_SETS, POINT_LABELS, box=BOXES, multimask_output=False)
    for i in range(3):
        assert_same(out, predictor.predict(POINT_SETS[i], POINT_LABELS[i], box=BOXES[i], multimask_output=False), i)


def test_ragged_point_lists(predictor):
    coords = [np.array([[20, 30]]), np.array([[100, 70], [10, 80], [64, 64]]), np.array([[45, 35], [120, 10]])]
    labels = [np.array([1]), np.array([1, 0, 1]), np.array([0, 1])]
    out = predictor.predict(coords, labels)
    assert out[0].shape[0] == 3
    for i in range(3):
        assert_same(out, predictor.predict(coords[i], labels[i]), i)


def test_batched_mask_input_with_points(predictor):
    _, _, low = predictor.predict(POINT_SETS, POINT_LABELS, multimask_output=False)  # (3, 1, 64, 64)
    out = predictor.predict(POINT_SETS, POINT_LABELS, mask_input=low, multimask_output=False)
    for i in range(3):
        single = predictor.predict(POINT_SETS[i], POINT_LABELS[i], mask_input=low[i], multimask_output=False)
        assert_same(out, single, i)
    # The mask prompt is used: the output differs from the same points without it.
    assert np.abs(out[2] - low).max() > 1e-3


def test_segmenter_mixed_prompts_and_chunking(model, image):
    seg = Segmenter(model, prompt_batch_size=2)  # several chunks per structure group
    emb = seg.embed(image)
    prompts = [
        Prompt(points=[[20, 30]], labels=[1]),
        Prompt(box=BOXES[0]),
        Prompt(points=[[100, 70], [10, 80]], labels=[1, 0], box=BOXES[1]),
        Prompt(points=[[60, 40]], labels=[0]),
        Prompt(box=BOXES[2]),
        Prompt(points=[[5, 85]], labels=[1]),
        Prompt(box=BOXES[1]),
    ]
    batched = seg.segment(emb, prompts, multimask_output=True)
    assert len(batched) == len(prompts)
    for pred, prompt in zip(batched, prompts):
        alone = seg.segment(emb, prompt)
        assert_same((pred.masks, pred.scores, pred.low_res_logits), (alone.masks, alone.scores, alone.low_res_logits))


def test_several_images_in_one_call(model, image):
    seg = Segmenter(model)
    other = make_image(140, 70, seed=5)
    third = make_image(64, 64, seed=6)
    embs = seg.embed_many([image, other, third], batch_size=2)
    for emb, img in zip(embs, [image, other, third]):
        alone = seg.embed(img)
        assert emb.original_size == alone.original_size and emb.input_size == alone.input_size
        torch.testing.assert_close(emb.image_embeddings, alone.image_embeddings, atol=1e-5, rtol=0)
    prompts = [
        [Prompt(points=[[20, 30]], labels=[1]), Prompt(box=BOXES[1])],
        Prompt(box=[10, 20, 60, 130]),
        [Prompt(points=[[32, 32], [5, 5]], labels=[1, 0])],
    ]
    results = seg.segment_images([image, other, third], prompts)
    assert results[1].masks.shape[-2:] == (140, 70)
    for img, prm, res in zip([image, other, third], prompts, results):
        emb = seg.embed(img)
        for one, r in zip(prm if isinstance(prm, list) else [prm], res if isinstance(res, list) else [res]):
            alone = seg.segment(emb, one)
            assert_same((r.masks, r.scores, r.low_res_logits), (alone.masks, alone.scores, alone.low_res_logits))


def test_stored_embedding_reproduces_predict_without_encoder(model, predictor):
    expected = predictor.predict(np.array([[20, 30], [60, 40]]), np.array([1, 0]), box=BOXES[0])
    stored = predictor.get_image_embedding().clone().numpy()  # e.g. saved with np.save and read back
    size = predictor.original_size
    fresh = SamPredictor(model)
    with mock.patch.object(model.image_encoder, "forward", side_effect=AssertionError("encoder was called")):
        fresh.set_image_embedding(stored, size)
        got = fresh.predict(np.array([[20, 30], [60, 40]]), np.array([1, 0]), box=BOXES[0])
        # An ImageEmbedding value works too.
        fresh.set_image_embedding(predictor.embedding)
        got2 = fresh.predict(np.array([[20, 30], [60, 40]]), np.array([1, 0]), box=BOXES[0])
    for a, b, c in zip(expected, got, got2):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert fresh.input_size == predictor.input_size


def test_reset_image(model, image):
    p = SamPredictor(model)
    assert not p.is_image_set
    p.set_image(image)
    assert p.is_image_set
    p.reset_image()
    assert not p.is_image_set
    with pytest.raises(ValueError, match="set_image"):
        p.predict(np.array([[10, 10]]), np.array([1]))


def test_pil_path_and_bgr_inputs(model, image, predictor, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    reference = predictor.get_image_embedding()
    p = SamPredictor(model)
    for source, fmt in [(Image.fromarray(image), "RGB"), (path, "RGB"), (str(path), "RGB"), (image[..., ::-1], "BGR")]:
        p.set_image(source, image_format=fmt)
        assert p.original_size == (90, 130)
        assert torch.equal(p.get_image_embedding(), reference)


def test_predict_torch_matches_predict(predictor):
    coords, labels = POINT_SETS, POINT_LABELS
    t = predictor.transform
    tc = torch.as_tensor(t.apply_coords(coords, predictor.original_size), dtype=torch.float)
    tb = torch.as_tensor(t.apply_boxes(BOXES, predictor.original_size), dtype=torch.float)
    masks, iou, low = predictor.predict_torch(tc, torch.as_tensor(labels), tb)
    expected = predictor.predict(coords, labels, box=BOXES)
    assert masks.dtype == torch.bool and masks.shape == (3, 3, 90, 130)
    assert_same((masks.numpy(), iou.numpy(), low.numpy()), expected)
    logits, _, _ = predictor.predict_torch(tc, torch.as_tensor(labels), tb, return_logits=True)
    assert logits.dtype == torch.float32
    assert torch.equal(logits > 0, masks)


def test_return_logits_and_single_mask(predictor):
    masks, scores, low = predictor.predict(np.array([[20, 30]]), np.array([1]), multimask_output=False)
    assert masks.shape == (1, 90, 130) and masks.dtype == bool and scores.shape == (1,) and low.shape == (1, 64, 64)
    logits, _, _ = predictor.predict(np.array([[20, 30]]), np.array([1]), multimask_output=False, return_logits=True)
    assert logits.dtype == np.float32 and np.array_equal(logits > 0, masks)


def test_sam_forward_equals_predictor(model, image):
    """The released batched_input entry point: two images with their own prompts in one call."""
    other = make_image(70, 140, seed=9)
    t = SamPredictor(model).transform
    batched_input = []
    for img, coords, labels, boxes in [
        (image, POINT_SETS[:2], POINT_LABELS[:2], BOXES[:2]),
        (other, POINT_SETS[2:], POINT_LABELS[2:], None),
    ]:
        resized = torch.as_tensor(np.array(t.apply_image(img))).permute(2, 0, 1).contiguous()
        record = {
            "image": resized,
            "original_size": img.shape[:2],
            "point_coords": torch.as_tensor(t.apply_coords(coords, img.shape[:2]), dtype=torch.float),
            "point_labels": torch.as_tensor(labels),
        }
        if boxes is not None:
            record["boxes"] = torch.as_tensor(t.apply_boxes(boxes, img.shape[:2]), dtype=torch.float)
        batched_input.append(record)
    outputs = model(batched_input, multimask_output=True)
    p = SamPredictor(model)
    p.set_image(image)
    expected0 = p.predict(POINT_SETS[:2], POINT_LABELS[:2], box=BOXES[:2])
    p.set_image(other)
    expected1 = p.predict(POINT_SETS[2:], POINT_LABELS[2:])
    for out, expected in zip(outputs, [expected0, expected1]):
        got = (out["masks"].numpy(), out["iou_predictions"].numpy(), out["low_res_logits"].numpy())
        assert_same(got, expected)


def test_image_embedding_value(predictor):
    emb = predictor.embedding
    assert isinstance(emb, ImageEmbedding)
    assert emb.image_embeddings.shape == (1, 64, 16, 16)
    assert emb.input_size == (177, 256)  # 90x130 with the long side resized to 256
