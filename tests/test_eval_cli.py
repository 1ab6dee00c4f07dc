"""`segany eval run` end to end on a tiny random model, the report writers, and the shared datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.conftest import DATASETS, needs_shared


@pytest.fixture()
def tiny_checkpoint(tmp_path, tiny_sam):
    from segany.io.checkpoint import save_checkpoint

    path = tmp_path / "tiny.pth"
    save_checkpoint(tiny_sam, path)
    return path


@pytest.fixture()
def tiny_folder(tmp_path):
    root = tmp_path / "data"
    for sub in ("images", "masks", "ignore"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        m = np.zeros((48, 64), np.uint8)
        m[10 + i:30, 12:40 + i] = 255
        Image.fromarray(m).save(root / "masks" / f"{i}.png")
        band = np.zeros((48, 64), np.uint8)
        band[8 + i:32, 10:42 + i] = 255
        band[m > 0] = 0
        Image.fromarray(band).save(root / "ignore" / f"{i}.png")
    return root


def run_cli(args):
    from segany.cli.main import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_eval_run_writes_all_reports(tmp_path, tiny_checkpoint, tiny_folder):
    out = tmp_path / "out"
    result = run_cli(["eval", "run", "-c", str(tiny_checkpoint), "-d", str(tiny_folder), "-p", "single-point",
                      "-p", "interactive", "-p", "box", "--max-clicks", "2", "--limit", "1", "-o", str(out),
                      "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert report["checkpoint"]["sha256"] and report["checkpoint"]["released"] is None
    assert "not a known released one" in report["warning"]
    assert report["mode"] == "exact" and report["settings"]["max_clicks"] == 2
    res = report["results"]["data"]
    assert res["single-point"]["instances"] == 1 and len(res["interactive"]["curve"]) == 2
    assert 0.0 <= res["single-point"]["mIoU"] <= res["single-point"]["mIoU_oracle"] <= 1.0
    assert 1 <= res["interactive"]["NoC@85"] <= 2
    # the first interactive click is the single-point question: same answer
    assert res["interactive"]["curve"][0] == pytest.approx(res["single-point"]["mIoU"])
    lines = (out / "instances.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["dataset"] == "data"
    md = (out / "summary.md").read_text()
    assert "Warning" in md and "| data | 1 |" in md and "NoC@85" in md
    for png in ("miou_vs_clicks.png", "worst_single-point.png", "worst_interactive.png", "worst_box.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_user_errors_are_one_line(tmp_path, tiny_checkpoint, tiny_folder, capsys):
    from segany.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "run", "-c", str(tiny_checkpoint), "-d", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset not found") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["eval", "run", "-c", str(tiny_checkpoint), "-d", str(tiny_folder), "-p", "proposals",
              "-o", str(tmp_path / "o")])
    assert exc.value.code == 2 and "COCO-format" in capsys.readouterr().err


def test_known_checkpoint_has_no_warning(tmp_path, monkeypatch):
    from segany.eval import report as report_mod

    path = tmp_path / "ckpt.pth"
    path.write_bytes(b"pretend released weights")
    info = report_mod.checkpoint_info(path)
    assert info["warning"] and info["released"] is None
    monkeypatch.setitem(report_mod.KNOWN_CHECKPOINTS, info["sha256"], "SAM test release")
    info = report_mod.checkpoint_info(path)
    assert info["released"] == "SAM test release" and info["warning"] is None
    md = report_mod.markdown_summary(report_mod.build_report({"checkpoint": info, "model": "m", "mode": "exact"}, {}))
    assert "Warning" not in md and "released: SAM test release" in md


# ------------------------------------------------------------------ the shared benchmark data


@needs_shared
def test_grabcut_reader_on_shared_data():
    from segany.eval.datasets import open_dataset

    ds = open_dataset("grabcut", root=DATASETS)
    assert len(ds) == 50
    with_band = 0
    for sample in ds:
        inst = sample.instances[0]
        assert sample.image.dtype == np.uint8 and inst.mask.shape == sample.image.shape[:2]
        assert inst.mask.any() and inst.ignore is not None and not (inst.mask & inst.ignore).any()
        with_band += bool(inst.ignore.any())
    # some GrabCut ignore files are empty; every non-empty one must come through
    expected = sum(bool(np.asarray(Image.open(p)).any()) for p in (DATASETS / "grabcut" / "ignore").glob("*.png"))
    assert with_band == expected > 0


@needs_shared
def test_davis_and_coco_readers_on_shared_data():
    from segany.eval.datasets import CocoDataset, limited, open_dataset

    davis = open_dataset("davis345", root=DATASETS)
    assert len(davis) == 345
    sample = next(iter(davis))
    assert sample.instances[0].ignore is None and 0 < sample.instances[0].mask.mean() < 1
    coco = open_dataset("coco", root=DATASETS)
    assert isinstance(coco, CocoDataset)
    data = json.loads((DATASETS / "coco-mini" / "annotations" / "instances_val2017.json").read_text())
    samples = list(limited(coco, 5))
    for s in samples:
        anns = [a for a in data["annotations"] if a["image_id"] == s.image_id]
        assert len(s.instances) <= sum(not a["iscrowd"] for a in anns)
        assert {i.annotation_id for i in s.instances} <= {a["id"] for a in anns if not a["iscrowd"]}
        for inst in s.instances:
            assert inst.mask.shape == s.image.shape[:2] and inst.mask.any()


def test_segany_everything_mode_feeds_the_proposals_protocol(tmp_path, tiny_sam):
    from segany.eval.datasets import CocoDataset
    from segany.eval.protocols import SeganyProposalGenerator, evaluate_proposals
    from tests.test_eval_protocols import write_coco

    path, images = write_coco(tmp_path)
    ds = CocoDataset(path, images)
    gen = SeganyProposalGenerator(tiny_sam, {"points_per_side": 2, "pred_iou_thresh": 0.0,
                                             "stability_score_thresh": 0.0})
    samples = list(ds)[:1]
    proposals = gen.generate(samples[0].image)
    assert proposals and all(isinstance(p["segmentation"]["counts"], str) for p in proposals)
    summary = evaluate_proposals(gen, samples, ds.coco)["proposals"]["summary"]
    assert summary["images"] == 1 and summary["mean_proposals"] == len(proposals)
    assert 0.0 <= summary["AR@10"] <= summary["AR@100"] <= summary["AR@1000"] <= 1.0
