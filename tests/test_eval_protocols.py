"""The protocols driven by predictors whose answers are known, on tiny synthetic datasets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segany.eval.clicks import Click
from segany.eval.datasets import CocoDataset, ImageSample, Instance, MaskFolderDataset, open_dataset
from segany.eval.protocols import (EvalSettings, Predictor, PredictorOutput, ProposalGenerator, WorstCases,
                                   evaluate_prompted, evaluate_proposals)


def l_shape(shape=(24, 32), y0=4, x0=6):
    """An L inside a 10x10 box: a 3-wide vertical bar and a 3-high bottom bar; area 30 + 21 = 51."""
    m = np.zeros(shape, dtype=bool)
    m[y0:y0 + 10, x0:x0 + 3] = True
    m[y0 + 7:y0 + 10, x0:x0 + 10] = True
    return m


def square(shape, y0, y1, x0, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def filled_box(mask):
    ys, xs = np.nonzero(mask)
    return square(mask.shape, ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)


def synthetic_samples():
    shape = (24, 32)
    img = np.full(shape + (3,), 90, dtype=np.uint8)
    a = l_shape(shape)
    b = square(shape, 2, 8, 20, 30)
    img2 = img.copy()
    img2[0, 0] = 1  # a different image
    c = square(shape, 10, 20, 10, 20)
    return [ImageSample("a", img, [Instance(a), Instance(b)]), ImageSample("b", img2, [Instance(c)])]


class KnownPredictor(Predictor):
    """Answers from the ground truth: the instance under the first positive click or inside the box."""

    def __init__(self, samples, answer):
        self.by_image = {s.image.tobytes(): s.instances for s in samples}
        self.answer = answer  # "gt", "box" or "empty"
        self.embeds = 0
        self.mask_inputs = []

    def embed(self, image):
        self.embeds += 1
        return self.by_image[image.tobytes()]

    def predict(self, handle, points=None, labels=None, box=None, mask_input=None, multimask=True):
        self.mask_inputs.append(mask_input)
        if points is not None:
            x, y = points[np.asarray(labels) == 1][0].astype(int)
            inst = next(i for i in handle if i.mask[y, x])
        else:
            inst = min(handle, key=lambda i: np.abs(i.box - box).sum())  # the nearest ground-truth box
        shape = inst.mask.shape
        if self.answer == "gt":
            mask = inst.mask
        elif self.answer == "box":
            mask = filled_box(inst.mask)
        else:
            mask = np.zeros(shape, dtype=bool)
        n = 3 if multimask else 1
        masks = np.stack([mask] * n)
        return PredictorOutput(masks, np.linspace(0.9, 0.5, n), np.full((n, 256, 256), float(len(self.mask_inputs))))


def test_oracle_predictor_gives_miou_one_and_noc_one():
    samples = synthetic_samples()
    pred = KnownPredictor(samples, "gt")
    res = evaluate_prompted(pred, samples, ["single-point", "interactive", "box"], "synthetic",
                            EvalSettings(max_clicks=5))
    assert pred.embeds == 2  # one embedding per image for all instances, clicks and protocols
    sp, it, bx = res["single-point"]["summary"], res["interactive"]["summary"], res["box"]["summary"]
    assert sp["instances"] == 3 and sp["mIoU"] == 1.0 and sp["mIoU_oracle"] == 1.0
    assert it["NoC@85"] == 1.0 and it["NoC@90"] == 1.0 and it["NoF@90"] == 0
    assert it["curve"] == [1.0] * 5
    assert bx["mIoU"] == 1.0
    # perfect answers need no more clicks
    assert all(len(r["clicks"]) == 1 for r in res["interactive"]["records"])


def test_filled_box_predictor_gives_the_hand_computed_iou():
    samples = synthetic_samples()
    res = evaluate_prompted(KnownPredictor(samples, "box"), samples, ["single-point", "interactive", "box"],
                            "synthetic", EvalSettings(max_clicks=4))
    # L shape: 51 of its 100-pixel box; the squares are their own boxes
    expected = [0.51, 1.0, 1.0]
    assert [r["iou_top"] for r in res["single-point"]["records"]] == pytest.approx(expected)
    assert [r["iou"] for r in res["box"]["records"]] == pytest.approx(expected)
    assert res["single-point"]["summary"]["mIoU"] == pytest.approx(np.mean(expected))
    rec = res["interactive"]["records"][0]
    assert rec["ious"] == pytest.approx([0.51] * 4)  # the box never changes
    # every later click is negative (the box's false part) and lies outside the object
    assert [c[2] for c in rec["clicks"][1:]] == [0, 0, 0]
    gt = samples[0].instances[0].mask
    assert not any(gt[y, x] for x, y, _ in rec["clicks"][1:])
    it = res["interactive"]["summary"]
    assert it["NoC@85"] == pytest.approx((4 + 1 + 1) / 3) and it["NoF@85"] == 1


def test_empty_predictor_gives_noc_max_clicks():
    samples = synthetic_samples()
    pred = KnownPredictor(samples, "empty")
    res = evaluate_prompted(pred, samples, ["interactive"], "synthetic", EvalSettings(max_clicks=7))
    it = res["interactive"]["summary"]
    assert it["NoC@85"] == 7 and it["NoC@90"] == 7 and it["NoF@90"] == 3
    assert it["curve"] == [0.0] * 7
    # every click is positive, and the previous answer's low-res logits are fed back
    rec = res["interactive"]["records"][0]
    assert len(rec["clicks"]) == 7 and all(c[2] == 1 for c in rec["clicks"])
    # call k + 1 gets the logits answered by call k (filled with k by the predictor); the first gets none
    assert pred.mask_inputs[0] is None
    fed = pred.mask_inputs[1:7]
    assert [float(m.flat[0]) for m in fed] == [1, 2, 3, 4, 5, 6]


def test_predictor_returning_no_masks_counts_as_empty():
    samples = synthetic_samples()

    class Nothing(KnownPredictor):
        def predict(self, *a, **k):
            return PredictorOutput(np.zeros((0, 24, 32), bool), np.zeros(0), None)

    res = evaluate_prompted(Nothing(samples, "gt"), samples, ["single-point", "interactive"], "s",
                            EvalSettings(max_clicks=3))
    assert res["single-point"]["summary"]["mIoU"] == 0.0
    assert res["interactive"]["summary"]["NoC@85"] == 3


def test_instances_without_valid_pixels_are_skipped():
    samples = synthetic_samples()
    empty = Instance(np.zeros((24, 32), bool))
    hidden = Instance(square((24, 32), 0, 4, 0, 4), ignore=square((24, 32), 0, 5, 0, 5))
    samples[1].instances += [empty, hidden]
    res = evaluate_prompted(KnownPredictor(samples, "gt"), samples, ["single-point"], "s")
    assert res["single-point"]["summary"]["instances"] == 3


def test_wrong_mask_size_is_a_clear_error():
    samples = synthetic_samples()

    class WrongSize(KnownPredictor):
        def predict(self, *a, **k):
            return PredictorOutput(np.zeros((1, 5, 5), bool), np.ones(1), None)

    with pytest.raises(ValueError, match="shape"):
        evaluate_prompted(WrongSize(samples, "gt"), samples, ["single-point"], "s")


def test_worst_cases_keeps_the_lowest():
    worst = WorstCases(keep=2, side=16)
    img = np.zeros((32, 48, 3), np.uint8)
    m = np.zeros((32, 48), bool)
    for value in (0.9, 0.2, 0.5, 0.1, 0.7):
        worst.add(value, "d", "p", str(value), img, m, m)
    cases = worst.cases()
    assert [c.iou for c in cases] == [0.1, 0.2]
    assert cases[0].image.shape == (11, 16, 3)
    # a small object in a large image is shown with context around it, prompts moved along
    big = np.zeros((400, 600, 3), np.uint8)
    obj = square((400, 600), 100, 120, 300, 340)
    worst = WorstCases(keep=1, side=1000)
    worst.add(0.3, "d", "p", "x", big, obj, obj, [Click(310, 105, True)], box=np.array([300, 100, 340, 120]))
    case = worst.cases()[0]
    assert case.image.shape == (84, 104, 3)  # rows 68..152, columns 268..372
    assert case.clicks == [Click(42, 37, True)] and case.box.tolist() == [32, 32, 72, 52]
    assert case.gt.sum() == obj.sum()


# ------------------------------------------------------------------ COCO-format data


def write_coco(tmp_path: Path):
    """Two images; polygon, uncompressed-RLE and compressed-RLE instances and one crowd region."""
    from pycocotools import mask as mask_utils

    images_dir = tmp_path / "val"
    images_dir.mkdir()
    h, w = 40, 50
    for seed in (1, 2):  # distinct images: the test predictors recognise an image by its pixels
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            images_dir / f"{seed}.png")
    Image.fromarray(np.full((h, w, 3), 7, np.uint8)).save(images_dir / "3.png")

    def uncompressed(mask):
        flat = mask.T.reshape(-1).astype(np.uint8)  # column-major
        counts, current, run = [], 0, 0
        for v in flat:
            if v == current:
                run += 1
            else:
                counts.append(run)
                current, run = v, 1
        counts.append(run)
        return {"size": [h, w], "counts": counts}

    m2 = square((h, w), 20, 35, 5, 25)
    m3 = square((h, w), 5, 15, 30, 45)
    rle3 = mask_utils.encode(np.asfortranarray(m3.astype(np.uint8)))
    rle3["counts"] = rle3["counts"].decode("ascii")
    crowd = square((h, w), 0, 10, 0, 20)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 10, 20, 10], "area": 200,
         "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]]},
        {"id": 2, "image_id": 1, "category_id": 2, "iscrowd": 0, "bbox": [5, 20, 20, 15], "area": 300,
         "segmentation": uncompressed(m2)},
        {"id": 3, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [30, 5, 15, 10], "area": 150,
         "segmentation": rle3},
        {"id": 4, "image_id": 2, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 20, 10], "area": 200,
         "segmentation": uncompressed(crowd)},
        {"id": 5, "image_id": 3, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 20, 10], "area": 200,
         "segmentation": uncompressed(crowd)},
    ]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i in (1, 2, 3)],
            "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(data))
    return path, images_dir


def test_coco_reader_polygons_rle_and_crowd(tmp_path):
    path, images = write_coco(tmp_path)
    ds = CocoDataset(path, images)
    assert len(ds) == 2  # image 3 has only a crowd region
    samples = list(ds)
    assert [s.image_id for s in samples] == [1, 2]
    first, second = samples
    assert len(first.instances) == 2 and len(second.instances) == 1  # the crowd is not an instance
    assert first.instances[0].category_id == 1 and first.instances[1].category_id == 2
    assert first.instances[1].mask.sum() == 15 * 20 and first.instances[0].ignore is None
    inst = second.instances[0]
    assert inst.mask.sum() == 150 and inst.annotation_id == 3
    assert inst.ignore is not None and inst.ignore.sum() == 200  # the crowd region is ignored
    assert second.boxes[0].tolist() == [30, 5, 45, 15]
    # the folder is guessed from instances_<split>.json
    assert open_dataset(path).image_dir == images


def test_mask_ap_of_the_ground_truth_is_one(tmp_path):
    path, images = write_coco(tmp_path)
    ds = CocoDataset(path, images)
    samples = list(ds)
    res = evaluate_prompted(KnownPredictor(samples, "gt"), samples, ["box"], "coco", coco=ds.coco)
    summary = res["box"]["summary"]
    assert summary["AP"] == pytest.approx(1.0) and summary["AP50"] == pytest.approx(1.0)
    assert summary["mIoU"] == pytest.approx(1.0)
    # and nothing right scores nothing
    empty = evaluate_prompted(KnownPredictor(samples, "empty"), samples, ["box"], "coco", coco=ds.coco)
    assert empty["box"]["summary"]["AP"] == pytest.approx(0.0)


class GroundTruthProposals(ProposalGenerator):
    def __init__(self, samples, extra=0):
        self.by_image = {s.image.tobytes(): s.instances for s in samples}
        self.extra = extra

    def generate(self, image):
        out = [{"segmentation": i.mask, "score": 0.9} for i in self.by_image[image.tobytes()]]
        # low-scoring junk proposals first in the list: ranking must put the good ones on top
        junk = [{"segmentation": square(image.shape[:2], 0, 2, k, k + 1), "score": 0.1} for k in range(self.extra)]
        return junk + out


def test_proposals_average_recall(tmp_path):
    path, images = write_coco(tmp_path)
    ds = CocoDataset(path, images)
    samples = list(ds)
    perfect = evaluate_proposals(GroundTruthProposals(samples, extra=20), samples, ds.coco)["proposals"]["summary"]
    assert perfect["AR@10"] == pytest.approx(1.0) and perfect["AR@1000"] == pytest.approx(1.0)
    assert perfect["mean_proposals"] == pytest.approx((22 + 21) / 2)

    class Nothing(ProposalGenerator):
        def generate(self, image):
            return []

    none = evaluate_proposals(Nothing(), samples, ds.coco)["proposals"]["summary"]
    assert none["AR@100"] == 0.0


# ------------------------------------------------------------------ mask folders


def test_mask_folder_reader(tmp_path):
    root = tmp_path / "data"
    for sub in ("images", "masks", "ignore"):
        (root / sub).mkdir(parents=True)
    img = np.zeros((12, 16, 3), np.uint8)
    Image.fromarray(img).save(root / "images" / "x.jpg")
    Image.fromarray(img).save(root / "images" / "y.png")
    Image.fromarray(img).save(root / "images" / "nomask.png")
    m = np.zeros((12, 16), np.uint8)
    m[2:6, 3:9] = 255
    Image.fromarray(m).save(root / "masks" / "x.png")
    Image.fromarray((m > 0).astype(np.uint8)).save(root / "masks" / "y.png")  # 0/1 masks as DAVIS
    band = np.zeros((12, 16), np.uint8)
    band[1:7, 2:10] = 255
    Image.fromarray(band).save(root / "ignore" / "x.png")
    ds = open_dataset(root)
    assert isinstance(ds, MaskFolderDataset) and len(ds) == 2
    x, y = list(ds)
    assert x.image_id == "x" and x.instances[0].mask.sum() == 24 and y.instances[0].mask.sum() == 24
    assert x.instances[0].ignore.sum() == 48 - 24 and not (x.instances[0].ignore & x.instances[0].mask).any()
    assert y.instances[0].ignore is None
    assert x.instances[0].box.tolist() == [3, 2, 9, 6]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "y.png")
    with pytest.raises(ValueError, match="mask"):
        list(ds)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        open_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither"):
        open_dataset(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="JSON"):
        open_dataset(bad)
    with pytest.raises(ValueError, match="no datasets folder|not found"):
        open_dataset("grabcut", root=tmp_path / "nowhere")


# ------------------------------------------------------------------ resuming


def test_resume_skips_finished_images_and_gives_the_same_figures(tmp_path):
    from segany.eval.progress import ProgressLog

    samples = synthetic_samples()
    run = {"sha256": "x", "protocols": ["single-point", "interactive"], "max_clicks": 3}
    settings = EvalSettings(max_clicks=3)
    log = ProgressLog(tmp_path / "p.jsonl", run)
    full = evaluate_prompted(KnownPredictor(samples, "box"), samples, run["protocols"], "s", settings,
                             done=log.done, on_records=log.append)
    # a run killed after the first image, with half a line written for the second
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 3
    (tmp_path / "p.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    log = ProgressLog(tmp_path / "p.jsonl", run)
    assert list(log.done) == ["a"]
    pred = KnownPredictor(samples, "box")
    resumed = evaluate_prompted(pred, samples, run["protocols"], "s", settings, done=log.done, on_records=log.append)
    assert pred.embeds == 1  # only image "b" was evaluated again
    for protocol in run["protocols"]:
        assert resumed[protocol]["summary"] == full[protocol]["summary"]
    assert set(ProgressLog(tmp_path / "p.jsonl", run).done) == {"a", "b"}
    # another run's log is not mixed in
    assert ProgressLog(tmp_path / "p.jsonl", {**run, "max_clicks": 4}).done == {}


def test_box_ap_resumes_from_records(tmp_path):
    from segany.eval.progress import ProgressLog

    path, images = write_coco(tmp_path)
    ds = CocoDataset(path, images)
    samples = list(ds)
    log = ProgressLog(tmp_path / "p.jsonl", {"run": 1})
    first = evaluate_prompted(KnownPredictor(samples, "gt"), samples[:1], ["box"], "c", coco=ds.coco,
                              done=log.done, on_records=log.append)
    assert first["box"]["records"][0]["segmentation"]["counts"]
    log = ProgressLog(tmp_path / "p.jsonl", {"run": 1})
    pred = KnownPredictor(samples, "gt")
    res = evaluate_prompted(pred, samples, ["box"], "c", coco=ds.coco, done=log.done, on_records=log.append)
    assert pred.embeds == 1 and res["box"]["summary"]["AP"] == pytest.approx(1.0)
