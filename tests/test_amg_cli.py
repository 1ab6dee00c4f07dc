"""`segany everything` end to end on the fixture checkpoint (tiny grid, small images)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from segany.cli.everything import collect_images, everything, output_names
from segany.cli.main import main
from segany.io import coco as coco_io
from segany.io import sa1b

from .conftest import REFERENCE, needs_shared

pytestmark = needs_shared

OPTIONS = ["--points-per-side", "2", "--pred-iou-thresh", "0.05", "--stability-score-thresh", "0.5",
           "--stability-score-offset", "0.02"]


@pytest.fixture
def inputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(REFERENCE / "synthetic_97x61.png", folder / "a.png")
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((40, 70, 3)) * 255).astype(np.uint8)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def run(args):
    return CliRunner().invoke(everything, args, catch_exceptions=False)


def test_sa1b_viz_resume_and_failure(inputs, tmp_path):
    out = tmp_path / "out"
    ckpt = str(REFERENCE / "sam_vit_small.pth")
    result = run([str(inputs), "--checkpoint", ckpt, "--out", str(out), "--viz", "--cutouts", *OPTIONS])
    assert result.exit_code == 1  # one image failed, the others were done
    assert "broken.png" in result.output and "2 image(s) segmented" in result.output
    doc = sa1b.read_sa1b(out / "a.json")
    assert doc["image"]["width"] == 97 and doc["image"]["height"] == 61
    assert len(doc["annotations"]) > 0
    assert (out / "a.overlay.png").is_file() and len(list((out / "a_cutouts").glob("*.png"))) == len(doc["annotations"])
    from PIL import Image

    assert Image.open(out / "a_cutouts" / "0000.png").mode == "RGBA"
    # Resume: valid outputs are skipped; a damaged one is redone.
    (out / "b.json").write_text("{truncated")
    result = run([str(inputs), "--checkpoint", ckpt, "--out", str(out), *OPTIONS])
    assert "1 image(s) segmented" in result.output and "1 already done" in result.output
    sa1b.read_sa1b(out / "b.json")
    assert not list(out.glob(".*.tmp"))
    assert doc["image"]["image_id"] == 1 and sa1b.read_sa1b(out / "b.json")["image"]["image_id"] == 2
    # Other settings in the same folder: stopped with the difference, nothing rewritten.
    before = (out / "a.json").read_bytes()
    changed = [o if o != "0.05" else "0.5" for o in OPTIONS]
    result = CliRunner().invoke(everything, [str(inputs), "--checkpoint", ckpt, "--out", str(out), *changed])
    assert result.exit_code == 2 and "pred_iou_thresh: 0.05 -> 0.5" in result.output and "--overwrite" in result.output
    assert (out / "a.json").read_bytes() == before


def test_coco_format_merges(inputs, tmp_path):
    (inputs / "broken.png").unlink()
    listing = tmp_path / "list.txt"
    listing.write_text("in/a.png\n# a comment\nin/b.jpg\n")
    out = tmp_path / "coco"
    out.mkdir()
    (out / "segany-run.json").write_text('{"checkpoint_sha256": "another model"}')  # --overwrite starts over
    result = run([str(listing), "-c", str(REFERENCE / "sam_vit_small.pth"), "-o", str(out), "--format", "coco",
                  "--overwrite", *OPTIONS])
    assert result.exit_code == 0, result.output
    merged = coco_io.read_coco(out / "instances.json")
    assert sorted(im["file_name"] for im in merged["images"]) == ["a.png", "b.jpg"]
    assert all(coco_io.annotation_mask(merged, a).sum() == a["area"] for a in merged["annotations"])


def test_user_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["everything", str(tmp_path / "missing.jpg"), "--checkpoint", "x.pth", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(ValueError):
        collect_images([str(tmp_path)])  # empty folder


def test_output_names_are_unique(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    names = output_names([tmp_path / "x" / "a.jpg", tmp_path / "y" / "a.jpg", tmp_path / "b.png"])
    assert len(set(names)) == 3 and names[2] == "b"
