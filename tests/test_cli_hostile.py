"""The CLI's promised one-line errors (exit 2) for the cases issue 20 found as tracebacks or silent
wrong results: devices, NaN weights, impossible thresholds, --out naming a file, resume mismatches."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from segany.cli.everything import RUN_LOG, check_run_log, display_names, sa1b_image_ids
from segany.cli.main import main

from .conftest import DATASETS, REFERENCE, ROOT, needs_shared

CKPT = REFERENCE / "sam_vit_small.pth"


def one_line_exit_2(argv, capsys, *expected):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert any(all(e in line for e in expected) for line in lines), err
    return err


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.new("RGB", (40, 30), (90, 120, 30)).save(path)
    return path


BAD_DEVICES = ["bogus", "cuda:0:1"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:1"])


@needs_shared
@pytest.mark.parametrize("device", BAD_DEVICES)
def test_bad_devices_are_one_line_for_every_command(device, image, tmp_path, capsys):
    one_line_exit_2(["segment", image, "-c", CKPT, "--point", "5,5", "--out", tmp_path / "o", "--device", device],
                    capsys, "device")
    one_line_exit_2(["segment", image, "-c", CKPT, "--point", "5,5", "--out", tmp_path / "o", "--fast",
                     "--device", device], capsys, "device")
    one_line_exit_2(["everything", image, "-c", CKPT, "--out", tmp_path / "e", "--device", device], capsys, "device")
    if (DATASETS / "grabcut").is_dir():
        one_line_exit_2(["eval", "run", "-c", CKPT, "-d", "grabcut", "--limit", "1", "-o", tmp_path / "ev",
                         "--device", device, "--data-root", DATASETS], capsys, "device")


@needs_shared
def test_segment_out_naming_a_file(image, tmp_path, capsys):
    existing = tmp_path / "taken.txt"
    existing.write_text("x")
    one_line_exit_2(["segment", image, "-c", CKPT, "--point", "5,5", "--out", existing], capsys, "taken.txt")
    one_line_exit_2(["export-onnx", "-c", CKPT, "--out", tmp_path], capsys, "directory")


@needs_shared
def test_nan_weights_are_refused_at_load(image, tmp_path, capsys):
    from segany.io.checkpoint import read_state_dict

    sd = read_state_dict(CKPT)
    key = next(k for k, v in sd.items() if v.is_floating_point() and "mask_decoder" in k)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    bad = tmp_path / "nan.pth"
    torch.save(sd, bad)
    one_line_exit_2(["segment", image, "-c", bad, "--point", "5,5", "--out", tmp_path / "o"], capsys, "NaN", key)
    sd[key].view(-1)[0] = float("inf")
    torch.save(sd, bad)
    one_line_exit_2(["everything", image, "-c", bad, "--out", tmp_path / "e"], capsys, "infinite")


@pytest.mark.parametrize("option,value", [
    ("--pred-iou-thresh", "5"), ("--pred-iou-thresh", "-0.1"), ("--stability-score-thresh", "1.5"),
    ("--box-nms-thresh", "0"), ("--crop-nms-thresh", "2"), ("--crop-overlap-ratio", "1"),
    ("--points-per-side", "0"), ("--min-mask-region-area", "-1"), ("--stability-score-offset", "-1"),
])
def test_impossible_thresholds_are_refused(option, value, tmp_path, capsys):
    one_line_exit_2(["everything", tmp_path, "-c", "x.pth", "--out", tmp_path / "o", option, value], capsys, option)


def test_resume_log_mismatch_stops_with_the_difference(tmp_path):
    import click

    out = tmp_path / "out"
    out.mkdir()
    run = {"checkpoint_sha256": "a" * 64, "mode": "exact", "format": "sa1b", "pred_iou_thresh": 0.88}
    check_run_log(out, run, ["img"], "sa1b", overwrite=False)  # a fresh folder: recorded
    assert json.loads((out / RUN_LOG).read_text()) == run
    check_run_log(out, dict(run), ["img"], "sa1b", overwrite=False)  # the same run resumes
    with pytest.raises(click.UsageError, match=r"pred_iou_thresh: 0.88 -> 0.5.*--overwrite"):
        check_run_log(out, dict(run, pred_iou_thresh=0.5), ["img"], "sa1b", overwrite=False)
    with pytest.raises(click.UsageError, match="checkpoint_sha256"):
        check_run_log(out, dict(run, checkpoint_sha256="b" * 64), ["img"], "sa1b", overwrite=False)
    check_run_log(out, dict(run, pred_iou_thresh=0.5), ["img"], "sa1b", overwrite=True)  # start over
    assert json.loads((out / RUN_LOG).read_text())["pred_iou_thresh"] == 0.5
    # Results without a log (made by an older version): unknown provenance, so not resumed silently.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "img.json").write_text("{}")
    with pytest.raises(click.UsageError, match="without"):
        check_run_log(legacy, run, ["img"], "sa1b", overwrite=False)


def test_same_file_names_in_two_folders_stay_apart(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.jpg").write_bytes(b"")
    (tmp_path / "a" / "y.jpg").write_bytes(b"")
    images = [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg", tmp_path / "a" / "y.jpg"]
    assert display_names(images) == ["a/x.jpg", "b/x.jpg", "y.jpg"]
    assert sa1b_image_ids([p.stem for p in images]) == [1, 2, 3]
    assert sa1b_image_ids(["sa_223750", "sa_12"]) == [223750, 12]


def test_serve_takes_c_as_the_docs_show():
    out = subprocess.run([sys.executable, "-m", "segany.cli.main", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "-c, --checkpoint" in out.stdout and "--token" in out.stdout
