"""Checkpoints: round trips in both formats, damaged files, key/shape errors, architecture inference."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import segany
from segany import CheckpointError, SamPredictor
from segany.io.checkpoint import infer_config, model_from_state_dict, read_state_dict, save_checkpoint
from segany.modeling import SAM_CONFIGS, build_sam

from .smallsam import make_image, one_thread, small_config, small_sam

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def model():
    return small_sam(seed=4)


@pytest.fixture(scope="module")
def image():
    return make_image(70, 50, seed=1)


def outputs(model, image):
    p = SamPredictor(model)
    p.set_image(image)
    masks, scores, low = p.predict(np.array([[20, 30], [40, 10]]), np.array([1, 0]), box=[5, 5, 45, 60])
    return p.get_image_embedding(), scores, low


@pytest.fixture(scope="module")
def expected(model, image):
    return outputs(model, image)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_same_logits(model, image, expected, tmp_path, suffix):
    path = save_checkpoint(model, tmp_path / f"small{suffix}")
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary left behind
    loaded = segany.load_model(path)
    # The architecture came from the state dict alone, including the non-default sizes.
    cfg = loaded.config
    assert cfg.encoder == small_config().encoder
    assert cfg.prompt_embed_dim == 64 and cfg.decoder.transformer_mlp_dim == 128
    emb, scores, low = outputs(loaded, image)
    assert torch.equal(emb, expected[0])
    assert np.array_equal(scores, expected[1]) and np.array_equal(low, expected[2])
    # Saved back in the other format, still the same tensors under the released key names.
    other = tmp_path / ("again.safetensors" if suffix == ".pth" else "again.pth")
    save_checkpoint(loaded, other)
    sd_a, sd_b = read_state_dict(path), read_state_dict(other)
    assert sd_a.keys() == sd_b.keys() == model.state_dict().keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_model_wrapper_dict(model, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": model.state_dict(), "epoch": 3, "optimizer": {}}, path)
    loaded = segany.load_model(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_float16_checkpoint_loads_as_float32(model, image, tmp_path):
    path = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert read_state_dict(path)["mask_decoder.iou_token.weight"].dtype == torch.float16
    loaded = segany.load_model(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = copy.deepcopy(model)  # the same weights rounded to float16 (buffers like pixel_mean are not)
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    emb_a, scores_a, low_a = outputs(loaded, image)
    emb_b, scores_b, low_b = outputs(rounded, image)
    torch.testing.assert_close(emb_a, emb_b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(low_a, low_b, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(model, tmp_path, suffix):
    full = save_checkpoint(model, tmp_path / f"full{suffix}")
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        segany.load_model(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_empty_file(tmp_path, suffix):
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        segany.load_model(empty)


@pytest.mark.parametrize(
    "name, content",
    [("notes.pth", b"just some text\n"), ("random.safetensors", bytes(range(256)) * 8), ("image.pt", b"\x89PNG\r\n\x1a\n" + b"0" * 64)],
)
def test_not_a_checkpoint(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        segany.load_model(path)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_pickle_of_something_else(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        segany.load_model(path)
    path2 = tmp_path / "other_model.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path2)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        segany.load_model(path2)


# ------------------------------------------------------------------ key and shape errors


def test_missing_key_names_key_and_shape(model, tmp_path):
    sd = dict(model.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    path = save_checkpoint(sd, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError) as info:
        segany.load_model(path)
    msg = str(info.value)
    assert "missing key 'mask_decoder.iou_token.weight'" in msg and "(1, 64)" in msg


def test_unexpected_key(model):
    sd = dict(model.state_dict())
    sd["mask_decoder.extra_head.weight"] = torch.zeros(3, 5)
    with pytest.raises(CheckpointError, match=r"unexpected key 'mask_decoder.extra_head.weight' \(shape \(3, 5\)\)"):
        model_from_state_dict(sd)


def test_shape_mismatch_names_expected_and_actual(model):
    sd = dict(model.state_dict())
    sd["mask_decoder.iou_prediction_head.layers.1.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError) as info:
        model_from_state_dict(sd)
    msg = str(info.value)
    assert "mask_decoder.iou_prediction_head.layers.1.weight" in msg
    assert "expected (64, 64), got (64, 32)" in msg


def test_wrong_size_for_registry_name(model, tmp_path):
    """sam_model_registry['vit_b'] with a checkpoint of another size names a mismatched key."""
    path = save_checkpoint(model, tmp_path / "small.pth")
    with torch.device("meta"):
        with pytest.raises(CheckpointError, match=r"shape mismatch for 'image_encoder\.[^']+': expected \("):
            segany.sam_model_registry["vit_b"](checkpoint=str(path))


def test_required_key_missing_for_inference(model):
    sd = dict(model.state_dict())
    del sd["prompt_encoder.no_mask_embed.weight"]
    with pytest.raises(CheckpointError, match="missing key 'prompt_encoder.no_mask_embed.weight'"):
        infer_config(sd)


# ------------------------------------------------------------------ architecture inference


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_infer_released_configs(name):
    """Built on the meta device: shapes only, no memory or time spent on weights."""
    released = SAM_CONFIGS[name]
    with torch.device("meta"):
        sd = build_sam(copy.deepcopy(released)).state_dict()
    cfg = infer_config(sd)
    enc, want = cfg.encoder, released.encoder
    assert (enc.embed_dim, enc.depth, enc.num_heads) == (want.embed_dim, want.depth, want.num_heads)
    assert tuple(enc.global_attn_indexes) == tuple(want.global_attn_indexes)
    assert (enc.window_size, enc.img_size, enc.patch_size) == (14, 1024, 16)
    assert enc == want and cfg.decoder == released.decoder
    assert cfg.prompt_embed_dim == 256 and cfg.mask_in_chans == 16


@pytest.mark.parametrize(
    "embed_dim, depth, heads, global_blocks, window, img_size",
    [(48, 3, 3, (0, 2), 7, 512), (64, 4, 4, (3,), 5, 320), (96, 2, 2, (), 14, 1024)],
)
def test_infer_other_sizes(embed_dim, depth, heads, global_blocks, window, img_size):
    from segany.modeling import ImageEncoderConfig, SamConfig

    cfg = SamConfig(
        encoder=ImageEncoderConfig(
            img_size=img_size, embed_dim=embed_dim, depth=depth, num_heads=heads,
            global_attn_indexes=global_blocks, window_size=window,
        )
    )
    with torch.device("meta"):
        sd = build_sam(cfg).state_dict()
    assert infer_config(sd).encoder == cfg.encoder


def test_registry():
    with torch.device("meta"):
        model = segany.sam_model_registry["vit_b"](checkpoint=None)
        default = segany.sam_model_registry["default"]()
    assert model.image_encoder.patch_embed.proj.weight.shape == (768, 3, 16, 16)
    assert len(model.image_encoder.blocks) == 12
    assert default.image_encoder.patch_embed.proj.weight.shape[0] == 1280  # "default" is vit_h, as released
    with pytest.raises(ValueError, match="unknown model type 'vit_xl'; known: .*vit_b"):
        segany.sam_model_registry["vit_xl"]
