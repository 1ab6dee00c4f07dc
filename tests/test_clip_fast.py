"""CLIP's fast image tower (segany/engine/clip.py): the same math as the released tower, and in bfloat16
close to float32 (the agreement docs/text.md states)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from segany.engine.clip import FastImageTower, encode_crops, encode_images, make_fast, normalize_crops
from segany.modeling.clip import CLIP, CLIP_CONFIGS, ClipConfig, ClipTextConfig, ClipVisionConfig
from segany.predict.text_select import ClipScorer, crop_masks, mask_crops, score_masks


def random_clip(seed: int, vision: ClipVisionConfig, embed: int = 64) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(ClipConfig(embed, vision, ClipTextConfig(77, 49408, 64, 1, 1))).eval()
    with torch.no_grad():  # biases and norms away from their zero / one initialisation
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def scene(seed: int, h: int = 90, w: int = 130, n: int = 9):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, h / 2), rng.uniform(2, w / 2)
        masks[i] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        masks[i, int(cy) % h, int(cx) % w] = True
    return image, masks


@pytest.mark.parametrize("seed,patch,size,layers", [(0, 16, 64, 2), (1, 8, 48, 3)])
def test_fast_tower_in_float32_is_the_released_tower(seed, patch, size, layers):
    """The engine's forward (patch product, normalisation folded for uint8 crops, class-token-only last
    block) computes the released model's embeddings when run in float32."""
    model = random_clip(seed, ClipVisionConfig(size, patch, 64, layers, 2))
    image, masks = scene(seed)
    crops = crop_masks(image, masks, size)
    tower = FastImageTower(model.visual)
    with torch.no_grad():
        want = model.encode_image(normalize_crops(crops))
        from_uint8 = tower(tower.embed_uint8(crops))
        from_pixels = tower(tower.embed_pixels(normalize_crops(crops)))
    torch.testing.assert_close(from_uint8, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_pixels, want, rtol=1e-4, atol=1e-5)


def test_crop_masks_is_mask_crops_before_normalisation():
    image, masks = scene(3)
    crops = crop_masks(image, masks, 32)
    assert crops.dtype == torch.uint8 and crops.shape == (len(masks), 32, 32, 3)
    torch.testing.assert_close(normalize_crops(crops), mask_crops(image, masks, 32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the threaded resizes give the serial answer
        single = crop_masks(image, masks, 32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, crops)


@pytest.mark.parametrize("seed", [0, 5])
def test_fast_mode_agrees_with_float32(seed):
    """bfloat16 fast mode against float32: each crop's embedding at cosine >= 0.999, each similarity
    within 0.01, and the best mask the same wherever float32's best leads by more than that error."""
    exact = random_clip(seed, ClipVisionConfig(64, 16, 128, 3, 2))
    fast = make_fast(copy.deepcopy(exact))
    assert fast.visual.conv1.weight.dtype == torch.bfloat16
    image, masks = scene(seed + 10, n=12)
    crops = crop_masks(image, masks, 64)
    a, b = encode_crops(exact, crops), encode_crops(fast, crops)
    assert b.dtype == torch.float32 and (a * b).sum(-1).min() >= 0.999
    # the normalised-pixel entry point of fast mode agrees with its uint8 one
    assert (encode_images(fast, normalize_crops(crops)) * b).sum(-1).min() >= 0.999
    phrases = ["a dog", "a red car", "the sky"]
    s_exact, _ = score_masks(image, masks, phrases, ClipScorer(exact))
    s_fast, _ = score_masks(image, masks, phrases, ClipScorer(fast))
    error = np.abs(s_exact - s_fast).max()
    assert error <= 0.01
    for p in range(len(phrases)):
        best = np.argmax(s_fast[p])
        assert s_exact[p, best] >= s_exact[p].max() - 2 * error


def test_fast_tower_follows_the_model_to_another_dtype_or_device():
    model = make_fast(random_clip(2, ClipVisionConfig(32, 16, 64, 1, 1)))
    image, masks = scene(2, n=3)
    crops = crop_masks(image, masks, 32)
    fast = encode_crops(model, crops)
    model.float()  # back to float32: the released forward, not a stale bfloat16 tower
    exact = encode_crops(model, crops)
    with torch.no_grad():
        want = torch.nn.functional.normalize(model.encode_image(normalize_crops(crops)), dim=-1)
    torch.testing.assert_close(exact, want)
    assert (fast * exact).sum(-1).min() > 0.99
    assert encode_crops(model, crops[:0]).shape == (0, 64)


@pytest.mark.heavy
def test_fast_mode_agrees_with_float32_on_vit_b32():
    """The released ViT-B/32 shapes (random weights): what docs/text.md states for fast mode."""
    torch.manual_seed(0)
    exact = CLIP(CLIP_CONFIGS["ViT-B-32"]).eval()
    fast = make_fast(copy.deepcopy(exact))
    image, masks = scene(7, 240, 320, n=16)
    crops = crop_masks(image, masks, 224)
    a, b = encode_crops(exact, crops), encode_crops(fast, crops)
    assert (a * b).sum(-1).min() >= 0.999


@pytest.mark.parametrize("activation", ["none", "swish"])
@pytest.mark.parametrize("rows", [1, 37, 1600])
def test_packed_linear_is_the_product(activation, rows):
    """The fast tower's linear layers (oneDNN-packed bfloat16 weights, SiLU fused where asked) against
    float32 F.linear on the same bfloat16 numbers, for any row count (the packing is for 1600 rows)."""
    from segany.engine.clip import _Linear

    torch.manual_seed(rows)
    weight, bias = (torch.randn(96, 64) * 0.1).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(2, rows, 64).bfloat16()
    got = _Linear(weight, bias, activation)(x)
    want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    if activation == "swish":
        want = torch.nn.functional.silu(want)
    assert got.shape == (2, rows, 96) and got.dtype == torch.bfloat16
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_fast_model_can_be_copied_and_pickled(tmp_path):
    model = make_fast(random_clip(4, ClipVisionConfig(32, 16, 64, 1, 1)))
    pixels = torch.randn(2, 3, 32, 32)
    want = encode_images(model, pixels)
    clone = copy.deepcopy(model)
    assert clone.fast_tower.visual is clone.visual
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (clone, loaded):
        torch.testing.assert_close(encode_images(other, pixels), want)
