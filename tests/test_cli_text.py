"""`segany segment --text`: files and scores, and its bad input as one line with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import segany.predict.amg as amg
from segany.cli.main import main
from segany.modeling.clip import CLIP, ClipConfig, ClipTextConfig, ClipVisionConfig
from segany.predict.text_select import select_by_text

from .conftest import REFERENCE, needs_shared

IMAGE = REFERENCE / "synthetic_97x61.png"
CKPT = REFERENCE / "sam_vit_small.pth"


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    torch.manual_seed(2)
    model = CLIP(ClipConfig(32, ClipVisionConfig(64, 16, 64, 1, 1), ClipTextConfig(77, 49408, 64, 1, 1))).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path, model


def known_candidates(h: int, w: int) -> np.ndarray:
    masks = np.zeros((5, h, w), bool)
    masks[0, : h // 2], masks[1, h // 2 :], masks[2, :, : w // 3], masks[3, 10:40, 20:70], masks[4, 5:15, 5:15] = (True,) * 5
    return masks


@needs_shared
def test_segment_text_writes_masks_overlay_and_scores(clip_file, tmp_path, monkeypatch, capsys):
    path, model = clip_file
    image = np.array(Image.open(IMAGE).convert("RGB"))
    candidates = known_candidates(*image.shape[:2])

    class Records:
        def masks(self):
            return candidates

        def __len__(self):
            return len(candidates)

    class Generator:  # stands in for everything mode (its own tests cover it), so the test stays fast
        def __init__(self, source, settings=None):
            assert hasattr(source, "image_encoder")

        def generate_records(self, rgb):
            return Records()

    monkeypatch.setattr(amg, "MaskGenerator", Generator)
    out = tmp_path / "out"
    main(["segment", str(IMAGE), "-c", str(CKPT), "--text", "a red square", "--text", "a cat",
          "--negative", "background", "--clip", str(path), "--top", "2", "--cutout", "-o", str(out)])
    assert "4 mask(s) of 5 candidates" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    want = select_by_text(image, candidates, ["a red square", "a cat"], model, top_k=2, negative=["background"])
    assert [(m["phrase"], m["candidate"]) for m in result["masks"]] == [(m.phrase, m.index) for m in want]
    np.testing.assert_allclose(result["scores"], [m.score for m in want], rtol=1e-5)
    assert result["prompts"] == {"text": ["a red square", "a cat"], "negative": ["background"], "top": 2}
    for i, m in enumerate(want):
        png = np.array(Image.open(out / f"mask_{i}.png"))
        assert np.array_equal(png > 127, candidates[m.index])
    for name in result["files"]:
        assert (out / name).is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--text", ""], "--text is empty"),
        (["--text", "a dog", "--point", "3,3"], "cannot be combined"),
        (["--negative", "sky"], "go with --text"),
        (["--text", "a dog", "--top", "0"], "--top must be at least 1"),
        (["--text", "a dog", "--clip", "/nonexistent/clip.pt"], "not found"),
    ],
)
@needs_shared
def test_segment_text_bad_input_is_one_line(args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "segany.cli.main", "segment", str(IMAGE), "-c", str(CKPT), *args, "-o", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@needs_shared
def test_segment_text_offline_without_clip_file_says_so(tmp_path):
    env = {"SEGANY_HOME": str(tmp_path / "home"), "SEGANY_MODEL_BASE_URL": "http://127.0.0.1:9/", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "segany.cli.main", "segment", str(IMAGE), "-c", str(CKPT), "--text", "a dog", "-o", str(tmp_path)],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 2 and "ViT-B-32.pt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


FASTSAM = REFERENCE.parent / "fastsam" / "fastsam_s_random.pt"


@needs_shared
@pytest.mark.skipif(not FASTSAM.is_file(), reason="../shared/fixtures/fastsam is absent")
def test_segment_text_with_fastsam_as_the_mask_source(clip_file, tmp_path, capsys):
    """-c fastsam-s: the candidates are FastSAM's instances (one network pass), scored as SAM's are."""
    import segany
    from segany.predict.fastsam import FastSam

    from .conftest import DATASETS

    path, model = clip_file
    image_file = DATASETS / "grabcut" / "images" / "124080.jpg"
    out = tmp_path / "out"
    main(["segment", str(image_file), "-c", str(FASTSAM), "--text", "a flower", "--top", "3", "--clip", str(path),
          "-o", str(out)])
    result = json.loads((out / "result.json").read_text())
    rgb = np.array(Image.open(image_file).convert("RGB"))
    candidates = FastSam(segany.load_model(FASTSAM)).generate_records(rgb).masks()
    assert result["candidates"] == len(candidates) > 3
    want = select_by_text(rgb, candidates, "a flower", model, top_k=3)
    assert [m["candidate"] for m in result["masks"]] == [m.index for m in want]
    np.testing.assert_allclose(result["scores"], [m.score for m in want], rtol=1e-5)
    for i, m in enumerate(want):
        assert np.array_equal(np.array(Image.open(out / f"mask_{i}.png")) > 127, candidates[m.index])
    assert f"of {len(candidates)} candidates" in capsys.readouterr().out
