"""`segany segment` end to end on a fixture image with the fixture checkpoint, and the help texts."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segany import SamPredictor
from segany.cli.main import cli, main
from segany.io.viz import cutout_rgba, draw_prompts, overlay_masks, palette, save_png

from .conftest import REFERENCE, needs_shared
from .smallsam import make_image, one_thread

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

IMAGE = REFERENCE / "synthetic_97x61.png"
CKPT = REFERENCE / "sam_vit_small.pth"


def read_png(path):
    return np.array(Image.open(path))


@needs_shared
def test_segment_writes_masks_overlay_and_json(fixture_sam, tmp_path, capsys):
    out = tmp_path / "out"
    main(["segment", str(IMAGE), "-c", str(CKPT), "--point", "40,30", "--point", "10,10,0",
          "--box", "5,5,80,50", "--multimask", "--cutout", "-o", str(out)])
    assert "3 mask(s)" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["size"] == {"width": 97, "height": 61}
    assert result["prompts"]["points"] == [{"x": 40.0, "y": 30.0, "label": 1}, {"x": 10.0, "y": 10.0, "label": 0}]
    assert result["prompts"]["box"] == [5.0, 5.0, 80.0, 50.0] and result["multimask"] is True
    for name in result["files"]:
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))

    # The PNGs are exactly the predictor's masks, best score first.
    image = np.array(Image.open(IMAGE).convert("RGB"))
    p = SamPredictor(fixture_sam)
    p.set_image(image)
    masks, scores, low = p.predict(np.array([[40, 30], [10, 10]]), np.array([1, 0]), box=np.array([5, 5, 80, 50]))
    order = np.argsort(-scores, kind="stable")
    assert [m["file"] for m in result["masks"]] == ["mask_0.png", "mask_1.png", "mask_2.png"]
    np.testing.assert_allclose(result["scores"], scores[order], atol=1e-6)
    for i, k in enumerate(order):
        png = read_png(out / f"mask_{i}.png")
        assert png.shape == (61, 97) and png.dtype == np.uint8
        assert np.array_equal(png > 127, masks[k]) and set(np.unique(png)) <= {0, 255}
        assert result["masks"][i]["area"] == int(masks[k].sum())
        cut = read_png(out / f"cutout_{i}.png")
        assert cut.shape[2] == 4 and cut[..., 3].max() == 255
    np.testing.assert_allclose(np.load(out / "low_res_logits.npy"), low[order], atol=1e-6)
    np.testing.assert_allclose(np.load(out / "best_low_res.npy"), low[order[:1]], atol=1e-6)
    overlay = read_png(out / "overlay.png")
    assert overlay.shape == (61, 97, 3) and not np.array_equal(overlay, image)

    # Chaining: the best logits of this run refine the next one, exactly like predict(mask_input=...).
    out2 = tmp_path / "out2"
    main(["segment", str(IMAGE), "-c", str(CKPT), "--point", "40,30", "--mask-input",
          str(out / "best_low_res.npy"), "-o", str(out2)])
    refined, _, _ = p.predict(np.array([[40, 30]]), np.array([1]), mask_input=low[order[:1]], multimask_output=False)
    assert np.array_equal(read_png(out2 / "mask_0.png") > 127, refined[0])
    assert json.loads((out2 / "result.json").read_text())["masks"][0]["file"] == "mask_0.png"


def test_help_texts():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0 and "segment" in top.output and "Quick start" in top.output
    seg = runner.invoke(cli, ["segment", "--help"])
    assert seg.exit_code == 0
    for needle in ["--point X,Y[,LABEL]", "--box X0,Y0,X1,Y1", "--checkpoint", "--multimask", "--mask-input",
                   "--fast", "Examples:", "segany segment photo.jpg", "result.json", "foreground"]:
        assert needle in seg.output, needle


# ------------------------------------------------------------------ viz


def test_overlay_masks_colours_and_outlines():
    image = np.full((40, 50, 3), 100, np.uint8)
    a = np.zeros((40, 50), bool)
    a[5:25, 5:30] = True
    b = np.zeros((40, 50), bool)
    b[20:38, 20:48] = True
    out = overlay_masks(image, [a, b], alpha=0.5, outline_width=1)
    colors = palette(2)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[0, 0], image[0, 0])  # outside every mask: untouched
    assert np.array_equal(out[12, 15], np.round((100 + colors[0].astype(float)) / 2).astype(np.uint8))
    assert np.array_equal(out[5, 15], colors[0])  # outline pixel
    assert np.array_equal(out[30, 40], np.round((100 + colors[1].astype(float)) / 2).astype(np.uint8))
    assert not np.array_equal(colors[0], colors[1])
    assert np.array_equal(palette(10)[:2], colors)  # deterministic, independent of the count
    assert len({tuple(c) for c in palette(20)}) == 20
    plain = overlay_masks(image, a, colors=(255, 0, 0), alpha=1.0, outline=False)
    assert np.array_equal(plain[a], np.tile([255, 0, 0], (a.sum(), 1))) and np.array_equal(plain[~a], image[~a])
    assert np.array_equal(overlay_masks(image, np.zeros((0, 40, 50), bool)), image)
    with pytest.raises(ValueError, match="masks must be"):
        overlay_masks(image, np.zeros((30, 50), bool))


def test_cutout_and_prompts(tmp_path):
    image = make_image(40, 50)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:35] = True
    mask[12, 5] = False
    cut = cutout_rgba(image, mask)
    assert cut.shape == (10, 30, 4)
    assert cut[2, 0, 3] == 0 and cut[0, 0, 3] == 255 and np.array_equal(cut[0, 0, :3], image[10, 5])
    full = cutout_rgba(image, mask, crop_to_mask=False)
    assert full.shape == (40, 50, 4) and np.array_equal(full[..., 3] > 0, mask)
    drawn = draw_prompts(image, [[10, 10], [30, 30]], [1, 0], box=[5, 5, 45, 35])
    assert tuple(drawn[10, 10]) == (40, 220, 60) and tuple(drawn[30, 30]) == (235, 40, 40)
    assert np.array_equal(image, make_image(40, 50))  # input untouched
    save_png(tmp_path / "m.png", mask)
    save_png(tmp_path / "c.png", cut)
    assert np.array_equal(read_png(tmp_path / "m.png") > 0, mask)
    assert np.array_equal(read_png(tmp_path / "c.png"), cut)
    with pytest.raises(ValueError, match="bool or uint8"):
        save_png(tmp_path / "f.png", mask.astype(np.float32))
