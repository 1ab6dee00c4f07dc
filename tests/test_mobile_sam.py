"""MobileSAM (TinyViT encoder) against the released mobile_sam outputs, and its checkpoint handling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import segany
from segany.io import infer_config, read_state_dict, save_checkpoint
from segany.modeling.tiny_vit import TinyViT, TinyViTConfig, window_offsets_index

from .conftest import REFERENCE, case_image_path, import_reference, load_rgb, needs_shared
from .test_reference_sam import _cases, check_case

FIXTURE = REFERENCE / "mobile_sam_vit_t.pth"


@pytest.fixture(scope="module")
def mobile_sam():
    if not FIXTURE.is_file():
        pytest.skip("../shared/fixtures/reference is absent")
    return segany.load_model(FIXTURE)


@pytest.fixture(scope="module")
def predictors(mobile_sam):
    cache = {}

    def get(image_name: str):
        if image_name not in cache:
            predictor = segany.SamPredictor(mobile_sam)
            predictor.set_image(load_rgb(case_image_path(image_name)))
            cache[image_name] = predictor
        return cache[image_name]

    return get


@needs_shared
@pytest.mark.parametrize("case", _cases("mobile_sam_vit_t"), ids=lambda c: f"{c['image']}-{c['name']}")
def test_mobile_sam_case(predictors, case):
    check_case(predictors(case["image"]), case)


@needs_shared
def test_released_layout_inferred_from_keys(mobile_sam):
    cfg = mobile_sam.config
    assert cfg.encoder_kind == "tiny_vit" and cfg.variant == "sam"
    assert isinstance(mobile_sam.image_encoder, TinyViT)
    enc = cfg.encoder
    assert tuple(enc.embed_dims) == (64, 128, 160, 320)
    assert tuple(enc.depths) == (2, 2, 6, 2)
    assert tuple(enc.num_heads[1:]) == (4, 5, 10)
    assert tuple(enc.window_sizes[1:]) == (7, 14, 7)
    assert enc.num_classes == 1000


@needs_shared
def test_save_load_round_trip_keeps_released_keys(mobile_sam, tmp_path):
    released = read_state_dict(FIXTURE)
    path = save_checkpoint(mobile_sam, tmp_path / "mobile_sam.pt", dtype=torch.float16)
    saved = read_state_dict(path)
    assert list(saved) == list(released)
    for key, value in released.items():
        assert saved[key].shape == value.shape, key
        if value.is_floating_point() and saved[key].is_floating_point():
            assert torch.equal(saved[key], value), key
    reloaded = segany.load_model(path)
    assert infer_config(saved) == mobile_sam.config
    for key, value in mobile_sam.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key].to(value.dtype), value), key


def test_window_bias_index_matches_first_appearance_order():
    """The released numbering: offsets numbered in order of first appearance over all pairs."""
    window = 5
    points = [(y, x) for y in range(window) for x in range(window)]
    numbering: dict = {}
    expected = []
    for p in points:
        for q in points:
            offset = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            expected.append(numbering.setdefault(offset, len(numbering)))
    assert window_offsets_index(window).flatten().tolist() == expected


def test_small_tiny_vit_shapes_and_padding():
    """A 256-pixel TinyViT whose windows do not divide the grids (padding on every stage)."""
    torch.manual_seed(0)
    cfg = TinyViTConfig(
        img_size=256, embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4),
        window_sizes=(7, 5, 3, 6), num_classes=0,
    )
    encoder = TinyViT(cfg).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        out = encoder(x)
        embedding, interm = encoder.forward_with_interm(x)
        single = encoder(x[1:])
    assert out.shape == (2, 256, 16, 16)
    assert interm.shape == (2, 24, 16, 16)
    torch.testing.assert_close(embedding, out)
    torch.testing.assert_close(single, out[1:], atol=1e-5, rtol=1e-5)  # images do not leak into each other
    assert "head.weight" not in encoder.state_dict()


def test_tiny_vit_rejects_bad_configs():
    with pytest.raises(ValueError, match="multiple of 16"):
        TinyViT(TinyViTConfig(img_size=1000))
    with pytest.raises(ValueError, match="one length"):
        TinyViT(TinyViTConfig(depths=(2, 2)))


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights and batch-norm statistics, so that every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=gen) * 0.2
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values)


def tiny_vit_of_another_size(seed: int):
    """A reference TinyViT of other widths, depths, heads and windows than vit_t with random weights, the
    plain module loaded strictly from it, a 1024-pixel input and the reference's output on it."""
    reference = import_reference("mobile_sam.modeling.tiny_vit_sam")
    kwargs = dict(embed_dims=[16, 24, 40, 320], depths=[1, 2, 1, 1], num_heads=[1, 3, 5, 4], window_sizes=[7, 6, 9, 5])
    ref = reference.TinyViT(img_size=1024, num_classes=10, mlp_ratio=2.0, drop_path_rate=0.0, **kwargs)
    _randomise(ref, seed)
    ref.eval()
    cfg = TinyViTConfig(
        embed_dims=tuple(kwargs["embed_dims"]), depths=tuple(kwargs["depths"]), num_heads=tuple(kwargs["num_heads"]),
        window_sizes=tuple(kwargs["window_sizes"]), mlp_ratio=2.0, num_classes=10,
    )
    encoder = TinyViT(cfg).eval()
    encoder.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref(x)
    return encoder, x, expected


@pytest.mark.parametrize("seed", [3])
def test_tiny_vit_matches_reference_on_another_size(seed):
    """A TinyViT of other widths, depths, heads and windows than vit_t, against the reference module."""
    encoder, x, expected = tiny_vit_of_another_size(seed)
    with torch.no_grad():
        got = encoder(x)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=0)


def test_other_tiny_vit_sizes_are_inferred_from_keys(tmp_path):
    """Widths, depths, heads, windows, ratios and a dropped classifier are all read back from the keys."""
    from segany.modeling import SamConfig, build_sam

    encoder = TinyViTConfig(
        embed_dims=(8, 16, 24, 48, 64), depths=(1, 2, 1, 3, 1), num_heads=(2, 2, 3, 4, 8),
        window_sizes=(7, 5, 3, 6, 4), mlp_ratio=2.0, mbconv_expand_ratio=3.0, local_conv_size=5, num_classes=0,
    )
    cfg = SamConfig(encoder=encoder, encoder_kind="tiny_vit")
    path = save_checkpoint(build_sam(cfg), tmp_path / "custom_tiny.pth")
    assert infer_config(read_state_dict(path)) == cfg
    model = segany.load_model(path)
    assert isinstance(model.image_encoder, TinyViT) and not hasattr(model.image_encoder, "head")
