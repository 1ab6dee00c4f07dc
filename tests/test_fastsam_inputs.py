"""FastSAM: checkpoint safety and bad inputs (no network runs except tiny ones), and the selection stage."""
from __future__ import annotations

import contextlib
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import SHARED

FIXTURE = SHARED / "fixtures" / "fastsam" / "fastsam_s_random.pt"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason="../shared/fixtures/fastsam is absent")


# ----------------------------------------------------------------------- hand-made ultralytics-style files


@contextlib.contextmanager
def fake_ultralytics_modules():
    """Importable stand-ins named ultralytics.nn.tasks etc., with segany's blocks temporarily renamed to
    the ultralytics names, so that torch.save pickles objects under the names released files use (the
    real package is never imported here)."""
    from segany.modeling import yolov8_seg as y

    places = {
        "ultralytics.nn.modules.conv": ("Conv", "Concat"),
        "ultralytics.nn.modules.block": ("Bottleneck", "C2f", "SPPF", "DFL", "Proto", "Upsample"),
        "ultralytics.nn.modules.head": ("Segment",),
    }
    names = ["ultralytics", "ultralytics.nn", "ultralytics.nn.modules", "ultralytics.nn.tasks", *places]
    saved = {n: sys.modules.get(n) for n in names}
    renamed = {}
    for n in names:
        sys.modules[n] = types.ModuleType(n)
    for module, classes in places.items():
        for cls_name in classes:
            cls = getattr(y, cls_name)
            renamed[cls] = cls.__module__
            cls.__module__ = module
            setattr(sys.modules[module], cls_name, cls)
    model_cls = type("SegmentationModel", (nn.Module,), {"__module__": "ultralytics.nn.tasks"})
    sys.modules["ultralytics.nn.tasks"].SegmentationModel = model_cls
    try:
        yield model_cls
    finally:
        for cls, module in renamed.items():
            cls.__module__ = module
        for n, module in saved.items():
            if module is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = module


def write_ultralytics_file(path, cfg, claimed_scale=None, extra=None):
    from segany.modeling.yolov8_seg import build_yolov8_seg

    with fake_ultralytics_modules() as model_cls:
        model = model_cls()
        model.model = build_yolov8_seg(cfg).model
        model.yaml = {"nc": 1, "scale": claimed_scale} if claimed_scale else {"nc": 1}
        model.names = {0: "object"}
        ckpt = {"model": model, "version": "8.0.120"}
        if extra is not None:
            ckpt["extra"] = extra
        torch.save(ckpt, path)
    return path


def small_config():
    from segany.modeling.yolov8_seg import yolov8_seg_config

    return yolov8_seg_config("n")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


# ----------------------------------------------------------------------- checkpoints


def test_hand_made_file_loads_without_ultralytics(tmp_path):
    from segany.io.fastsam_checkpoint import load_fastsam

    path = write_ultralytics_file(tmp_path / "n.pt", small_config(), claimed_scale="n")
    model = load_fastsam(path)
    assert model.config.name == "yolov8n-seg"


def test_disallowed_global_is_refused_by_name(tmp_path):
    from segany.io.errors import CheckpointError
    from segany.io.ultralytics_pickle import read_ultralytics_checkpoint

    path = write_ultralytics_file(tmp_path / "evil.pt", small_config(), extra=_Evil())
    with pytest.raises(CheckpointError, match=r"refused global 'posix.getcwd'|refused global 'nt.getcwd'"):
        read_ultralytics_checkpoint(path)


def test_getattr_cannot_reach_beyond_the_stand_ins():
    import pickle

    from segany.io.ultralytics_pickle import _inert_getattr, _stand_in

    stand_in = _stand_in("ultralytics.nn.modules.head.Detect")
    assert "forward" in repr(_inert_getattr(stand_in, "forward"))
    for obj, name in ((stand_in, "__subclasses__"), (os, "system"), (stand_in, "__init__")):
        with pytest.raises(pickle.UnpicklingError):
            _inert_getattr(obj, name)


def test_claimed_scale_must_match_the_weights(tmp_path):
    from segany.io.errors import CheckpointError
    from segany.io.fastsam_checkpoint import load_fastsam

    path = write_ultralytics_file(tmp_path / "liar.pt", small_config(), claimed_scale="x")
    with pytest.raises(CheckpointError, match="says it is yolov8x-seg but its weights are yolov8n-seg"):
        load_fastsam(path)


@needs_fixture
def test_loaded_under_another_name_is_refused():
    from segany.io.errors import CheckpointError
    from segany.io.fastsam_checkpoint import load_fastsam

    with pytest.raises(CheckpointError, match="loaded as fastsam-x .* holds yolov8s-seg"):
        load_fastsam(FIXTURE, expect="fastsam-x")


@needs_fixture
def test_truncated_file(tmp_path):
    from segany.io.errors import CheckpointError
    from segany.io.fastsam_checkpoint import load_fastsam

    data = FIXTURE.read_bytes()
    path = tmp_path / "FastSAM-s.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a complete torch checkpoint|truncated"):
        load_fastsam(path)


@needs_fixture
def test_safetensors_round_trip(tmp_path):
    import segany

    model = segany.load_model(FIXTURE)
    path = segany.save_checkpoint(model, tmp_path / "fastsam_s.safetensors")
    again = segany.load_model(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def _cli(capsys, *args):
    """The CLI entry point in-process: (exit code, stderr)."""
    from segany.cli.main import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@needs_fixture
def test_cli_bad_checkpoints_one_line_exit_2(tmp_path, capsys):
    evil = write_ultralytics_file(tmp_path / "evil.pt", small_config(), extra=_Evil())
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(FIXTURE.read_bytes()[:100_000])
    liar = write_ultralytics_file(tmp_path / "liar.pt", small_config(), claimed_scale="s")
    image = SHARED / "datasets" / "grabcut" / "images" / "124080.jpg"
    for ckpt, message in ((evil, "refused global"), (truncated, "truncated"), (liar, "says it is yolov8s-seg")):
        code, err = _cli(capsys, "segment", str(image), "-c", str(ckpt), "--point", "10,10", "-o", str(tmp_path / "o"))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_cli_bad_fastsam_options_exit_2(tmp_path, capsys):
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for option, value in (("--conf", "1.5"), ("--iou", "-0.1"), ("--imgsz", "0")):
        code, err = _cli(capsys, "everything", str(image), "-c", "fastsam-s", "-o", str(tmp_path / "o"), option, value)
        assert code == 2 and len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------- selection


def _blobs():
    masks = np.zeros((4, 20, 30), dtype=bool)
    masks[0, :, :] = True  # whole image
    masks[1, 2:10, 2:12] = True
    masks[2, 5:15, 8:20] = True
    masks[3, 12:18, 22:28] = True
    return masks


def test_select_points_semantics():
    from segany.predict import select

    masks = _blobs()
    assert select.select_points(masks, [[5, 5]], [1]).tolist() == [0, 1]
    # positive in 1 and 2's overlap, negative inside 3: 3 is not positive anyway; 0 holds the negative
    assert select.select_points(masks, [[9, 7], [24, 14]], [1, 0]).tolist() == [1, 2]
    # only negative points: every mask without one
    assert select.select_points(masks, [[24, 14]], [0]).tolist() == [1, 2]
    # fractional coordinates truncate; outside the image clips
    assert select.select_points(masks, [[11.9, 9.9]], [1]).tolist() == [0, 1, 2]
    assert select.select_points(masks, [[-5, 100]], [1]).tolist() == [0]


def test_merge_points_is_fastsam_repository_semantics():
    from segany.predict import select

    masks = _blobs()
    merged = select.merge_points(masks, [[9, 7]], [1])  # in 0 (largest), 2, 1 -> all painted
    np.testing.assert_array_equal(merged, masks[0])
    merged = select.merge_points(masks, [[24, 14], [3, 3]], [0, 1])
    # largest first: mask 0 holds both points (erased, then painted: points in order); mask 1 holds the
    # positive (painted); mask 3 holds the negative (erased)
    np.testing.assert_array_equal(merged, masks[0] & ~masks[3])


def test_select_boxes_best_iou_and_union():
    from segany.predict import select

    masks = _blobs()
    assert select.select_boxes(masks, [2, 2, 12, 10]).tolist() == [1]
    assert select.select_boxes(masks, [[2, 2, 12, 10], [22.7, 12.2, 28, 18]]).tolist() == [1, 3]
    assert select.select(masks, [[24, 14]], [1], [2, 2, 12, 10]).tolist() == [0, 1, 3]


def test_selection_over_sam_everything_records():
    """The selection stage works on SAM's everything-mode output too (records' masks)."""
    from segany.io import rle as rle_io
    from segany.predict import select
    from segany.predict.amg import MaskRecords

    masks = _blobs()
    records = MaskRecords((20, 30), rle_io.mask_counts(masks))
    np.testing.assert_array_equal(records.masks(), masks)
    assert select.select(records.masks(), boxes=[22, 12, 28, 18]).tolist() == [3]


@pytest.mark.parametrize(
    "call",
    [
        lambda s, m: s.select_points(m, [[1, 2, 3]], [1]),
        lambda s, m: s.select_points(m, [[1, 2]], [2]),
        lambda s, m: s.select_points(m, [[1, 2]], [1, 0]),
        lambda s, m: s.select_points(m, [[np.nan, 2]], [1]),
        lambda s, m: s.select_points(m, "a,b", [1]),
        lambda s, m: s.select_boxes(m, [5, 5, 1, 1]),
        lambda s, m: s.select_boxes(m, [1, 2, 3]),
        lambda s, m: s.select_boxes(m, [[0, 0, np.inf, 3]]),
        lambda s, m: s.select_boxes(m[0], [0, 0, 3, 3]),
    ],
)
def test_selection_bad_input(call):
    from segany.predict import select

    with pytest.raises(ValueError):
        call(select, _blobs())


def test_predictor_bad_input():
    from segany.modeling.yolov8_seg import build_yolov8_seg
    from segany.predict.fastsam_predictor import FastSamPredictor

    predictor = FastSamPredictor(build_yolov8_seg(small_config()), imgsz=64)
    with pytest.raises(ValueError, match="no image is set"):
        predictor.predict([[1, 1]], [1])
    predictor.set_image(np.zeros((40, 50, 3), np.uint8))
    with pytest.raises(ValueError, match="mask_input"):
        predictor.predict([[1, 1]], [1], mask_input=np.zeros((1, 256, 256)))
    with pytest.raises(ValueError, match="at least one prompt"):
        predictor.predict()
    with pytest.raises(ValueError, match="point_semantics"):
        predictor.predict([[1, 1]], [1], point_semantics="sam")
    with pytest.raises(ValueError):
        predictor.set_image(np.zeros((40, 50), np.uint8))
    for bad in ({"conf": 2}, {"iou": "a"}, {"imgsz": 0}, {"max_det": 0}):
        with pytest.raises(ValueError):
            FastSamPredictor(build_yolov8_seg(small_config()), **bad)


def test_fast_mode_bfloat16_runs_and_keeps_float32_outputs():
    from segany.engine.fastsam import FastSamEngine
    from segany.modeling.yolov8_seg import build_yolov8_seg

    torch.manual_seed(0)
    model = build_yolov8_seg(small_config())
    x = torch.rand(1, 3, 64, 96)
    exact_pred, exact_protos = FastSamEngine(model, "exact")(x)
    fused_pred, fused_protos = FastSamEngine(model, "fast", bfloat16=False)(x)
    torch.testing.assert_close(fused_pred, exact_pred, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(fused_protos, exact_protos, atol=1e-4, rtol=1e-4)
    engine = FastSamEngine(model, "fast")
    bf_pred, bf_protos = engine(x)
    assert bf_pred.dtype == torch.float32 and bf_pred.shape == exact_pred.shape
    assert bf_protos.dtype == torch.float32 and bf_protos.shape == exact_protos.shape
    # the stem and the decoding stay float32, the rest runs in bfloat16 (8-bit mantissa: 0.2-0.4 % here)
    layers = engine.network.model
    assert layers[0].layer.conv.weight.dtype == torch.float32 and layers[22].dfl.conv.weight.dtype == torch.float32
    assert layers[1].conv.weight.dtype == torch.bfloat16 and layers[22].proto.cv2.conv.weight.dtype == torch.bfloat16
    relative = lambda a, b: float((a - b).norm() / b.norm())
    assert relative(bf_protos, fused_protos) < 0.02 and relative(bf_pred[:, 5:], fused_pred[:, 5:]) < 0.02
    assert (bf_pred[:, :4] - fused_pred[:, :4]).abs().max() < 0.25  # input pixels


# ----------------------------------------------------------------------- post-processing rules


def test_border_snapping_and_whole_image_rule():
    from segany.predict.yolo_postprocess import snap_to_border, whole_image_rule

    boxes = torch.tensor([[19.9, 20.0, 281.0, 180.5], [5.0, 3.0, 290.0, 195.0], [50.0, 50.0, 60.0, 60.0]])
    snapped = snap_to_border(boxes, (200, 300))
    torch.testing.assert_close(snapped[0], torch.tensor([0.0, 20.0, 300.0, 200.0]))  # 280 < x2 -> w; 180 < y2 -> h
    torch.testing.assert_close(snapped[2], boxes[2])
    final = whole_image_rule(snapped, (200, 300))
    torch.testing.assert_close(final[1], torch.tensor([0.0, 0.0, 300.0, 200.0]))
    torch.testing.assert_close(final[0], snapped[0])  # IoU 0.9 exactly is not > 0.9
    torch.testing.assert_close(final[2], boxes[2])


@pytest.mark.parametrize("hw,imgsz,expect_hw", [((50, 100), 640, (320, 640)), ((321, 481), 1024, (704, 1024)),
                                                 ((480, 854), 1024, (576, 1024)), ((1000, 999), 640, (640, 640)),
                                                 ((7, 900), 333, (32, 352))])
def test_letterbox_geometry(hw, imgsz, expect_hw):
    from segany.predict.yolo_postprocess import boxes_to_image, check_imgsz, letterbox

    size = check_imgsz(imgsz)
    image = np.random.default_rng(0).integers(0, 255, (*hw, 3), dtype=np.uint8)
    boxed, lb = letterbox(image, size)
    assert boxed.shape[:2] == expect_hw and boxed.shape[0] % 32 == 0 and boxed.shape[1] % 32 == 0
    top, bottom, left, right = lb.pad_tblr
    assert top <= bottom <= top + 1 and left <= right <= left + 1
    assert (boxed[:top] == 114).all() and (boxed[boxed.shape[0] - bottom:] == 114).all()
    # the content rectangle maps back onto the whole image
    content = torch.tensor([[left, top, left + lb.new_hw[1], top + lb.new_hw[0]]], dtype=torch.float32)
    torch.testing.assert_close(boxes_to_image(content, lb), torch.tensor([[0.0, 0.0, hw[1], hw[0]]]))
