"""Every bad input gives a clear, one-line ValueError (CLI: one line on stderr, exit code 2)."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from segany import Prompt, SamPredictor, Segmenter
from segany.cli.main import main

from .conftest import REFERENCE, needs_shared
from .smallsam import make_image, one_thread, small_sam

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

H, W = 60, 80


@pytest.fixture(scope="module")
def model():
    return small_sam(seed=3)


@pytest.fixture(scope="module")
def predictor(model):
    p = SamPredictor(model)
    p.set_image(make_image(H, W))
    return p


def raises_clearly(match: str):
    """pytest.raises for a ValueError whose message matches and is a single line."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(ValueError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert "\n" not in str(self.info.value), f"multi-line message: {self.info.value!r}"
            return handled

    return _Check()


# ------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((H, W, 3), np.float32), "uint8"),
        (np.zeros((H, W, 3), np.int64), "uint8"),
        (np.zeros((H, W), np.uint8), r"HxWx3"),
        (np.zeros((H, W, 4), np.uint8), r"HxWx3"),
        (np.zeros((3, H, W), np.uint8), r"HxWx3"),
        (np.zeros((0, W, 3), np.uint8), "empty"),
        (np.zeros((H, 0, 3), np.uint8), "empty"),
        (torch.zeros(H, W, 3, dtype=torch.uint8), "not a tensor"),
        ([[1, 2, 3]], "HxWx3 uint8 array"),
        ("/no/such/image.png", "image not found"),
    ],
)
def test_bad_images(model, image, match):
    with raises_clearly(match):
        SamPredictor(model).set_image(image)


def test_unreadable_image_file(model, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with raises_clearly("cannot read image"):
        SamPredictor(model).set_image(bogus)


def test_bad_image_format(model):
    with raises_clearly("RGB' or 'BGR"):
        SamPredictor(model).set_image(make_image(H, W), image_format="HSV")


# ------------------------------------------------------------------ prompts


def test_predict_before_set_image(model):
    with raises_clearly("no image is set"):
        SamPredictor(model).predict(np.array([[10, 10]]), np.array([1]))
    with raises_clearly("no image is set"):
        SamPredictor(model).get_image_embedding()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(point_coords=[[W + 5, 10]], point_labels=[1]), "outside the 80x60 image"),
        (dict(point_coords=[[10, -1]], point_labels=[1]), "outside"),
        (dict(point_coords=[[10, 10]], point_labels=[2]), "0 \\(background\\) or 1 \\(foreground\\)"),
        (dict(point_coords=[[10, 10]], point_labels=[-1]), "0 \\(background\\) or 1"),
        (dict(point_coords=[[10, 10]]), "given together"),
        (dict(point_coords=[[10, 10, 1]], point_labels=[1]), "shape \\(K, 2\\)"),
        (dict(point_coords=[[10, 10], [5, 5]], point_labels=[1]), "does not match"),
        (dict(point_coords=[[np.nan, 10]], point_labels=[1]), "NaN"),
        (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "empty"),
        (dict(box=[30, 10, 20, 40]), "x1 < x0"),
        (dict(box=[10, 40, 20, 30]), "y1 < y0"),
        (dict(box=[10, 10, 20]), "x0, y0, x1, y1"),
        (dict(box=[10, 10, W + 20, 30]), "outside the 80x60 image"),
        (dict(box=[[1, 1, 5, 5], [9, 9, 2, 2]]), "x1 < x0"),
        (dict(), "at least one prompt"),
        (dict(mask_input=np.zeros((256, 256))), r"mask_input must be low-res logits of shape \(1, 64, 64\)"),
        (dict(mask_input=np.zeros((1, 1, 32, 32))), "mask_input must be low-res logits"),
        (dict(mask_input=np.full((1, 64, 64), np.inf)), "NaN or infinite"),
    ],
)
def test_bad_prompts(predictor, kwargs, match):
    with raises_clearly(match):
        predictor.predict(**kwargs)


def test_mismatched_prompt_batch_sizes(predictor):
    points = np.array([[[10, 10]], [[20, 20]], [[30, 30]]])
    labels = np.ones((3, 1))
    with raises_clearly("batch sizes do not agree"):
        predictor.predict(points, labels, box=np.array([[1, 1, 9, 9], [2, 2, 8, 8]]))
    with raises_clearly("batch sizes do not agree"):
        predictor.predict(points, labels, mask_input=np.zeros((2, 1, 64, 64)))
    with raises_clearly("list of label arrays"):
        predictor.predict([np.array([[10, 10]]), np.array([[1, 1], [2, 2]])], [np.array([1])])


def test_bad_stored_embedding(model):
    p = SamPredictor(model)
    with raises_clearly("original_size"):
        p.set_image_embedding(torch.zeros(1, 64, 16, 16))
    with raises_clearly(r"embedding must have shape \(1, 64, 16, 16\)"):
        p.set_image_embedding(torch.zeros(1, 256, 64, 64), (H, W))
    with raises_clearly("positive"):
        p.set_image_embedding(torch.zeros(1, 64, 16, 16), (0, W))


def test_bad_segmenter_calls(model):
    seg = Segmenter(model)
    emb = seg.embed(make_image(H, W))
    with raises_clearly("at least one point, a box or a mask"):
        seg.segment(emb, Prompt())
    with raises_clearly("ImageEmbedding"):
        seg.segment(make_image(H, W), Prompt(box=[1, 1, 5, 5]))
    with raises_clearly(r"a Prompt's box must have shape \(4,\)"):
        seg.segment(emb, Prompt(box=[[1, 1, 5, 5], [1, 1, 6, 6]]))
    with raises_clearly("images but prompts"):
        seg.segment_images([make_image(H, W)], [Prompt(box=[1, 1, 5, 5])] * 2)


def test_predict_torch_bad_shapes(predictor):
    with raises_clearly(r"\(B, K, 2\)"):
        predictor.predict_torch(torch.zeros(4, 2), torch.ones(4))
    with raises_clearly("given together"):
        predictor.predict_torch(torch.zeros(1, 4, 2), None)
    with raises_clearly("at least one prompt"):
        predictor.predict_torch(None, None)


# ------------------------------------------------------------------ CLI


def run_cli(argv, capsys):
    """Run `segany ...` in-process; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "photo.png"
    Image.fromarray(make_image(H, W)).save(path)
    return path


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--point", "10"], "--point '10' must be X,Y or X,Y,LABEL"),
        (["--point", "a,b"], "numbers only"),
        (["--point", "10,20,3"], "LABEL must be 1 \\(foreground\\) or 0"),
        (["--point", "10,,1"], "must be X,Y"),
        (["--point", "500,20"], "outside the 80x60 image"),
        (["--box", "1,2,3"], "--box '1,2,3' must be X0,Y0,X1,Y1"),
        (["--box", "50,10,20,40"], "X1 must be >= X0"),
        (["--box", "10,10,200,40"], "outside the 80x60 image"),
        (["--point", "nan,3"], "finite"),
        ([], "give at least one prompt"),
    ],
)
def test_cli_bad_prompts(image_file, tmp_path, capsys, extra, match):
    code, err = run_cli(["segment", str(image_file), "-c", "unused.pth", "-o", str(tmp_path / "o"), *extra], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_cli_bad_files(image_file, tmp_path, capsys):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.pth"
    junk.write_text("hello")
    text_image = tmp_path / "x.jpg"
    text_image.write_text("not a jpeg")
    cases = [
        (["segment", "/no/such.png", "-c", str(empty), "--point", "1,1"], "image not found"),
        (["segment", str(text_image), "-c", str(empty), "--point", "1,1"], "cannot read image"),
        (["segment", str(image_file), "-c", str(empty), "--point", "1,1"], "empty"),
        (["segment", str(image_file), "-c", str(junk), "--point", "1,1"], "junk.pth"),
        (["segment", str(image_file), "-c", str(tmp_path / "none.pth"), "--point", "1,1"], "checkpoint not found"),
        (["segment", str(image_file), "-c", "no_such_model", "--point", "1,1"], "unknown model"),
        (["segment", str(image_file), "-c", str(empty), "--mask-input", str(tmp_path / "m.npy")], "not found"),
    ]
    for argv, match in cases:
        code, err = run_cli([*argv, "-o", str(tmp_path / "o")], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and match in lines[0], (argv, err)


@needs_shared
def test_cli_bad_mask_input(image_file, tmp_path, capsys):
    ckpt = str(REFERENCE / "sam_vit_small.pth")
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 64, 64), np.float32))
    several = tmp_path / "several.npy"
    np.save(several, np.zeros((3, 256, 256), np.float32))
    for path, match in [(wrong, "mask_input must be low-res logits of shape (1, 256, 256)"), (several, "holds 3")]:
        code, err = run_cli(
            ["segment", str(image_file), "-c", ckpt, "--mask-input", str(path), "-o", str(tmp_path / "o")], capsys
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and match in lines[0], err


def test_cli_process_exit_code_and_no_traceback(image_file, tmp_path):
    """The real console entry point, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-c", "from segany.cli.main import main; main()", "segment", str(image_file),
         "-c", "x.pth", "--point", "10,20,7", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --point '10,20,7': LABEL must be 1 (foreground) or 0 (background), got 7"]
