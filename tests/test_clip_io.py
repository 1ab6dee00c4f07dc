"""CLIP checkpoints: TorchScript archives read without running their code, open_clip files, errors."""
from __future__ import annotations

import pickle
import zipfile

import pytest
import torch

import segany
from segany.io.clip import load_clip, looks_like_clip, read_clip_state_dict
from segany.io.errors import CheckpointError
from segany.io.zoo import find_entry
from segany.modeling.clip import CLIP, ClipConfig, ClipTextConfig, ClipVisionConfig


def tiny_clip(seed: int = 0, patch: int = 16, width: int = 64) -> CLIP:
    torch.manual_seed(seed)
    cfg = ClipConfig(32, ClipVisionConfig(64, patch, width, 2, width // 64), ClipTextConfig(77, 49408, 64, 2, 1))
    model = CLIP(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_torchscript(model: CLIP, path, dtype=torch.float16) -> None:
    size = model.image_size
    traced = torch.jit.trace(
        model.to(dtype), (torch.randn(1, 3, size, size, dtype=dtype), torch.randint(0, 49407, (1, 77))), check_trace=False
    )
    traced.save(str(path))
    model.float()


def test_torchscript_archive_loads_without_running_code(tmp_path, monkeypatch):
    model = tiny_clip(seed=3)
    path = tmp_path / "ViT-tiny.pt"
    save_torchscript(model, path)
    assert looks_like_clip(path)

    def refuse(*args, **kwargs):
        raise AssertionError("the archive's code must not run")

    monkeypatch.setattr(torch.jit, "load", refuse)
    loaded = segany.load_model(path)
    assert isinstance(loaded, CLIP) and loaded.config == model.config
    expected = {k: v.half().float() for k, v in model.state_dict().items()}  # the archive stored float16
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = CLIP(model.config).eval()
        ref.load_state_dict(expected)
        assert torch.allclose(loaded.encode_image(pixels), ref.encode_image(pixels), rtol=1e-5, atol=1e-6)


def test_torchscript_archive_with_hostile_global_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    save_torchscript(tiny_clip(), path)
    with zipfile.ZipFile(path) as src:
        items = [(info, src.read(info.filename)) for info in src.infolist()]

    class Boom:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil2.pt"
    with zipfile.ZipFile(bad, "w") as out:
        for info, data in items:
            if info.filename.endswith("/data.pkl"):
                data = pickle.dumps(Boom(), protocol=2)
            out.writestr(info, data)
    with pytest.raises(CheckpointError, match="refusing to load posix.system|refusing to load os.system"):
        read_clip_state_dict(bad)


def test_open_clip_training_checkpoint_and_safetensors(tmp_path):
    model = tiny_clip(seed=5)
    sd = model.state_dict()
    wrapped = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    loaded = load_clip(wrapped)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    from safetensors.torch import save_file

    st = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    assert looks_like_clip(st)
    assert isinstance(segany.load_model(st), CLIP)


def test_sam_checkpoint_is_not_taken_for_clip(tmp_path, tiny_sam):
    path = tmp_path / "sam.pth"
    torch.save(tiny_sam.state_dict(), path)
    assert not looks_like_clip(path)


def test_fast_mode_casts_the_image_tower(tmp_path):
    from segany.engine.clip import encode_images

    model = tiny_clip(seed=1)
    path = tmp_path / "c.pt"
    torch.save(model.state_dict(), path)
    exact, fast = segany.load_model(path), segany.load_model(path, mode="fast")
    assert fast.visual.conv1.weight.dtype == torch.bfloat16 and fast.token_embedding.weight.dtype == torch.float32
    pixels = torch.randn(3, 3, 64, 64)
    a, b = encode_images(exact, pixels), encode_images(fast, pixels)
    assert b.dtype == torch.float32 and (a * b).sum(-1).min() > 0.99  # cosine between exact and fast


def test_bad_checkpoints_are_one_line(tmp_path):
    sd = tiny_clip().state_dict()
    del sd["visual.proj"]
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="missing") as info:
        load_clip(path)
    assert "\n" not in str(info.value)
    not_clip = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, not_clip)
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        load_clip(not_clip)


def test_zoo_entry_carries_openai_sha256():
    entry = find_entry("clip_vit_b32")
    assert entry is find_entry("ViT-B-32") and entry.family == "CLIP"
    assert entry.url.startswith("https://openaipublic.azureedge.net/clip/models/")
    assert entry.url.split("/")[-2] == entry.sha256 and len(entry.sha256) == 64


def test_damaged_torchscript_archive_is_one_error(tmp_path):
    path = tmp_path / "ok.pt"
    save_torchscript(tiny_clip(), path)
    with zipfile.ZipFile(path) as src:
        items = [(info, src.read(info.filename)) for info in src.infolist()]
    bad = tmp_path / "cut.pt"
    with zipfile.ZipFile(bad, "w") as out:
        for info, data in items:
            if info.filename.endswith("/data/0"):
                data = data[: len(data) // 2]
            out.writestr(info, data)
    with pytest.raises(CheckpointError, match="damaged|not a readable"):
        segany.load_model(bad)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError):
        load_clip(truncated)
