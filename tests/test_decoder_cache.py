"""The decoder's image side is prepared once per embedding and kept with it (read-only, shared by every
decode): it may not change a result, go stale, or leak between calls and threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from segany.engine import make_fast
from segany.engine.twin import twin
from segany.predict.predictor import SamPredictor
from segany.predict.segmenter import Prompt, Segmenter

from .smallsam import make_image, one_thread, small_sam

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)

POINTS = [np.array([[40.0, 50.0]]), np.array([[150.0, 90.0], [60.0, 120.0]]), np.array([[10.0, 170.0]])]


def _decode(model, features, coords, cache=None, multimask=True):
    labels = torch.ones(coords.shape[:2], dtype=torch.int)
    with torch.no_grad():
        return model.decode(features, (coords, labels), None, None, multimask, cache=cache)


@pytest.mark.parametrize("fast", [False, True])
def test_cached_decode_equals_uncached(fast):
    model = small_sam(3)
    if fast:
        make_fast(model)
    seg = Segmenter(model)
    emb = seg.embed(make_image(180, 240, seed=1))
    coords = torch.tensor([[[30.0, 40.0]], [[200.0, 100.0]], [[120.0, 60.0]]])
    plain_low, plain_iou = _decode(seg.engine, emb.features, coords)
    for _ in range(2):  # the second call reads the kept image side
        low, iou = _decode(seg.engine, emb.features, coords, cache=emb.decoder_cache)
        torch.testing.assert_close(low, plain_low, rtol=0, atol=1e-5)
        torch.testing.assert_close(iou, plain_iou, rtol=0, atol=1e-5)
    side = emb.decoder_cache["mask_decoder_image_side"].side
    _decode(seg.engine, emb.features, coords[:1], cache=emb.decoder_cache)
    assert emb.decoder_cache["mask_decoder_image_side"].side is side  # re-used, not rebuilt


def test_results_do_not_alias_each_other():
    model = small_sam(4)
    predictor = SamPredictor(model)
    predictor.set_image(make_image(200, 160, seed=2))
    first = [predictor.predict(point_coords=p, point_labels=np.ones(len(p)), return_logits=True) for p in POINTS]
    kept = [tuple(np.copy(a) for a in out) for out in first]
    again = [predictor.predict(point_coords=p, point_labels=np.ones(len(p)), return_logits=True) for p in POINTS]
    for before, now, copy in zip(first, again, kept):
        for a, b, c in zip(before, now, copy):
            np.testing.assert_array_equal(a, c)  # earlier results untouched by later decodes
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert not np.allclose(first[0][2], first[1][2])  # different prompts, different results


def test_cache_follows_the_embedding_tensor():
    model = small_sam(5)
    seg = Segmenter(model)
    emb = seg.embed(make_image(160, 160, seed=3))
    coords = torch.tensor([[[60.0, 70.0]]])
    low, _ = _decode(seg.engine, emb.features, coords, cache=emb.decoder_cache)
    # Another embedding under the same cache: rebuilt, never the stale side.
    other = seg.embed(make_image(160, 160, seed=9))
    emb.features["image_embeddings"] = other.image_embeddings
    low_other, _ = _decode(seg.engine, emb.features, coords, cache=emb.decoder_cache)
    expected, _ = _decode(seg.engine, other.features, coords)
    torch.testing.assert_close(low_other, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(low_other, low)
    # Edited in place (outside inference mode the tensor counts its versions): rebuilt too.
    tensor = other.image_embeddings.clone()
    emb.features["image_embeddings"] = tensor
    _decode(seg.engine, emb.features, coords, cache=emb.decoder_cache)
    with torch.no_grad():
        tensor.mul_(-1.0)
    edited, _ = _decode(seg.engine, emb.features, coords, cache=emb.decoder_cache)
    expected, _ = _decode(seg.engine, {"image_embeddings": tensor}, coords)
    torch.testing.assert_close(edited, expected, rtol=0, atol=1e-5)


def test_concurrent_decodes_of_one_embedding():
    model = small_sam(6)
    seg = Segmenter(model)
    emb = seg.embed(make_image(192, 192, seed=4))
    prompts = [Prompt(points=np.array([[20.0 + 15 * i, 30.0 + 10 * i]]), labels=np.array([1])) for i in range(8)]
    expected = [seg.segment(emb, p, return_logits=True).low_res_logits for p in prompts]
    results = {}
    errors = []

    def work(tid):
        try:
            for _ in range(3):
                for i, p in enumerate(prompts):
                    results[(tid, i)] = seg.segment(emb, p, return_logits=True).low_res_logits
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (tid, i), low in results.items():
        np.testing.assert_allclose(low, expected[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_projected_image_side_equals_the_plain_path(dtype):
    """One prompt against a shared image side whose projections were made once (prepare(project=True):
    the first block's attentions on the projected image, later ones and the final attention with the
    PE projected) gives the tokens and image side of the plain path (projections folded into the
    tokens, image + PE formed): in float32 up to rounding; in bfloat16 as close to float32 as the
    plain bfloat16 path is."""
    transformer = twin(small_sam(7)).mask_decoder.transformer
    torch.manual_seed(0)
    image, pe, tokens = torch.randn(1, 64, 16, 16) * 2, torch.randn(1, 64, 16, 16), torch.randn(1, 7, 64) * 2
    with torch.no_grad():
        truth = transformer.run(transformer.prepare(image, pe), tokens, 5)  # float32, plain
        transformer.to(dtype)
        image, pe, tokens = image.to(dtype), pe.to(dtype), tokens.to(dtype)
        plain_side = transformer.prepare(image, pe)
        projected_side = transformer.prepare(image, pe, project=True)
        assert plain_side.first_block is None and plain_side.pe_projections is None
        assert projected_side.first_block is not None and len(projected_side.pe_projections) == 2
        plain = transformer.run(plain_side, tokens, 5)
        projected = transformer.run(projected_side, tokens, 5)
    for t, a, b in zip(truth, plain, projected):
        assert a.dtype == b.dtype == dtype
        assert t.abs().max() > 0.5  # not trivially small
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        else:
            plain_error = float((a.float() - t).norm() / t.norm())
            projected_error = float((b.float() - t).norm() / t.norm())
            assert plain_error < 0.04 and projected_error < 1.25 * plain_error + 0.005


def test_batched_hypernetworks_equal_one_mlp_per_token():
    decoder = twin(small_sam(8)).mask_decoder
    tokens = torch.randn(3, decoder.num_mask_tokens, decoder.transformer_dim)
    expected = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
    with torch.no_grad():
        torch.testing.assert_close(decoder.hypernetwork_weights(tokens), expected.detach(), rtol=0, atol=1e-5)
        decoder.output_hypernetworks_mlps[2].layers[1].weight.mul_(-1.0)  # kept weights follow a change
        changed = torch.stack([mlp(tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        assert not torch.allclose(changed, expected, atol=1e-3)
        torch.testing.assert_close(decoder.hypernetwork_weights(tokens), changed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("project", [False, True])
def test_final_attention_on_selected_tokens_equals_those_rows(project):
    """transformer.run(outputs=[indices]) gives exactly those tokens' rows of the full run (each token's
    final attention is independent of the others), and the same image side."""
    transformer = twin(small_sam(9)).mask_decoder.transformer
    torch.manual_seed(1)
    image, pe, tokens = torch.randn(1, 64, 16, 16), torch.randn(1, 64, 16, 16), torch.randn(1, 7, 64)
    with torch.no_grad():
        side = transformer.prepare(image, pe, project=project)
        all_tokens, keys = transformer.run(side, tokens, 5)
        for rows in ([0, 2, 3, 4], [0, 1], [4, 0]):
            picked, picked_keys = transformer.run(side, tokens, rows)
            assert picked.shape == (1, len(rows), 64)
            torch.testing.assert_close(picked, all_tokens[:, rows], rtol=0, atol=1e-6)
            torch.testing.assert_close(picked_keys, keys, rtol=0, atol=0)


@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_outputs_equal_those_of_all_tokens(multimask):
    """predict_masks with the tokens a decode returns (its final attention and hypernetworks run only
    for the IoU token and those mask tokens) gives the rows of a decode of every mask token."""
    decoder = twin(small_sam(10)).mask_decoder
    torch.manual_seed(2)
    image, pe = torch.randn(1, 64, 16, 16), torch.randn(1, 64, 16, 16)
    sparse, dense = torch.randn(2, 2, 64), torch.randn(1, 64, 1, 1).expand(2, 64, 16, 16)
    selected = slice(1, None) if multimask else slice(0, 1)
    with torch.no_grad():
        all_masks, all_iou = decoder.predict_masks(image, pe, sparse, dense)
        masks, iou = decoder.predict_masks(image, pe, sparse, dense, mask_tokens=selected)
        tokens = torch.randn(2, 3, decoder.transformer_dim)
        some = decoder.hypernetwork_weights(tokens, slice(1, 4))
        full = decoder.hypernetwork_weights(torch.cat([tokens[:, :1], tokens], 1))[:, 1:]
    assert all_masks.shape[1] == decoder.num_mask_tokens and masks.shape[1] == len(range(4)[selected])
    torch.testing.assert_close(masks, all_masks[:, selected], rtol=0, atol=1e-5)
    torch.testing.assert_close(iou, all_iou, rtol=0, atol=1e-6)
    torch.testing.assert_close(some, full, rtol=0, atol=1e-6)
