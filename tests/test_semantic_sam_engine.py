"""segany.engine.semantic_sam against the model definition it speeds up: the same maths in float32, up
to the order of floating-point sums (random small models, random images and sampling points)."""
from __future__ import annotations

import pytest
import torch

from segany.engine import semantic_sam as engine
from segany.modeling.semantic_sam import SemanticSam
from segany.modeling.semantic_sam.config import DecoderConfig, PixelDecoderConfig, SemanticSamConfig, SwinConfig
from segany.modeling.semantic_sam.deformable_attention import deformable_sample


def small_model(seed: int, window: int = 7) -> SemanticSam:
    cfg = SemanticSamConfig(
        swin=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=window),
        pixel_decoder=PixelDecoderConfig(encoder_layers=1, dim_feedforward=64),
        decoder=DecoderConfig(num_layers=2, dim_feedforward=64),
    )
    torch.manual_seed(seed)
    model = SemanticSam(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # none of the released zero inits: every path active
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5))
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deformable_gather_equals_grid_sample(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(9, 13), (5, 7), (3, 4), (1, 2)]
    s = sum(h * w for h, w in shapes)
    b, q, m, p, d = 2, 17, 4, 3, 8
    value = torch.randn(b, s, m, d, generator=g)
    # points well outside [0, 1] too: zero padding, partly outside, exactly on borders
    locations = torch.rand(b, q, m, len(shapes), p, 2, generator=g) * 1.6 - 0.3
    locations[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0])
    locations[0, 1, 0, :, 0] = torch.tensor([-5.0, 7.0])
    weights = torch.rand(b, q, m, len(shapes), p, generator=g)
    ours = engine.deformable_sample(value, shapes, locations, weights)
    ref = deformable_sample(value, shapes, locations, weights)
    assert ours.shape == ref.shape == (b, q, m * d)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("seed,size,window", [(0, (70, 100), 7), (3, (96, 64), 5)])
def test_image_features_equal_the_definition(seed, size, window):
    model = small_model(seed, window)
    g = torch.Generator().manual_seed(100 + seed)
    image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        ref = model.image_features(image)
        ours = engine.image_features(model, image)
        again = engine.image_features(model, image)  # from the caches
    assert ours.image_size == ref.image_size and ours.padded_size == ref.padded_size
    for a, b_ in [(ours.mask_features, ref.mask_features), *zip(ours.multi_scale, ref.multi_scale)]:
        assert a.shape == b_.shape
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(again.mask_features, ours.mask_features, atol=0, rtol=0)


def test_window_bias_follows_the_weights():
    model = small_model(5)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        engine.image_features(model, image)
        for stage in model.backbone.layers:
            for block in stage.blocks:
                block.attn.relative_position_bias_table.mul_(-2.0)
        ref = model.image_features(image)
        ours = engine.image_features(model, image)
    torch.testing.assert_close(ours.mask_features, ref.mask_features, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_points", [2, 13])  # 12 and 78 queries: the few-queries gather and the projected tables
def test_click_path_equals_the_definition(n_points):
    model = small_model(7)
    image = torch.randint(0, 256, (3, 80, 90), dtype=torch.uint8)
    points = torch.rand(n_points, 2, generator=torch.Generator().manual_seed(n_points), dtype=torch.float64)
    points[:2] = torch.tensor([[0.2, 0.7], [0.9, 0.1]], dtype=torch.float64)
    with torch.no_grad():
        features = model.image_features(image)
        ref = model.decode(features, points)
        ours = engine.decode(model, engine.image_values(model, features), points)
    torch.testing.assert_close(ours.masks, ref.masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.ious, ref.ious, atol=1e-5, rtol=1e-5)


def test_engine_runs_outside_no_grad():
    """Parameters that require grad (a model fresh from its constructor) and no torch.no_grad() around."""
    model = small_model(9)
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    x = model.preprocess(image)
    features = engine.pixel_decoder_features(model.sem_seg_head.pixel_decoder, engine.swin_features(model.backbone, x))
    assert not features[0].requires_grad
    value = torch.randn(1, 6, 2, 4, requires_grad=True)
    out = engine.deformable_sample(value, [(2, 3)], torch.rand(1, 5, 2, 1, 2, 2), torch.rand(1, 5, 2, 1, 2))
    assert out.shape == (1, 5, 8)


def test_packed_weights_follow_the_weights():
    """The engine packs layer weights once for oneDNN; changing them in place must be seen."""
    model = small_model(11)
    image = torch.randint(0, 256, (3, 72, 64), dtype=torch.uint8)
    with torch.no_grad():
        engine.image_features(model, image)
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.mul_(-0.5)
        ref = model.image_features(image)
        ours = engine.image_features(model, image)
    torch.testing.assert_close(ours.mask_features, ref.mask_features, atol=1e-4, rtol=1e-4)
    for a, b_ in zip(ours.multi_scale, ref.multi_scale):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)


def test_swin_batch_and_odd_sizes_equal_the_definition():
    """Two images at once (window gather offsets per image, shift-mask bands within an image), sizes
    that are no multiple of the window or of 2 (padding, patch merging)."""
    model = small_model(13, window=5)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 84, 108, generator=g)
    with torch.no_grad():
        ref = model.backbone(x)
        ours = engine.swin_features(model.backbone, x)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], atol=1e-4, rtol=1e-4)


def test_model_copies_and_saves_after_engine_use():
    """The engine's caches (packed weights, biases) must not stop copy.deepcopy or torch.save."""
    import copy
    import io

    model = small_model(17)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    first = engine.image_features(model, image)
    twin = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    torch.testing.assert_close(engine.image_features(twin, image).mask_features, first.mask_features)
