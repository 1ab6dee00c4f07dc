"""FastSAM live against ultralytics 8.4.190 (the oracle, imported through ../shared/tools/refshim):
other weights, images, sizes, the x scale, and the mask assembly on identical inputs. Heavy."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from tests.conftest import DATASETS, SHARED, import_reference, load_rgb

FIXTURE = SHARED / "fixtures" / "fastsam" / "fastsam_s_random.pt"

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(not FIXTURE.is_file(), reason="../shared/fixtures/fastsam is absent"),
]


def ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo_cfg_"))
    os.environ.setdefault("YOLO_VERBOSE", "0")
    return import_reference("ultralytics")


def perturbed_reference(seed: float):
    """ultralytics' FastSAM on the fixture checkpoint with its weights moved by seeded noise
    (a new network that keeps the fixture's conditioning), and the same weights in segany."""
    from segany.modeling.yolov8_seg import build_yolov8_seg, config_from_state_dict

    ul = ultralytics()
    ref = ul.FastSAM(str(FIXTURE))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            if p.is_floating_point() and "dfl" not in name:
                p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=gen).to(p.dtype))
    sd = {k: v.float() for k, v in ref.model.state_dict().items()}
    ours = build_yolov8_seg(config_from_state_dict(sd))
    ours.load_state_dict(sd)
    return ref, ours


def pair_and_compare(result, ref_boxes, ref_scores, ref_masks):
    """Pair detections by box and score (order may differ where scores tie within ~1e-4; snapped boxes
    can coincide, e.g. several whole-image boxes) and compare."""
    assert abs(len(result) - len(ref_scores)) <= max(1, len(ref_scores) // 50)
    matched = 0
    for i, box in enumerate(ref_boxes):
        if not len(result):
            break
        dist = np.abs(result.boxes - box).max(1) + 1e3 * np.abs(result.scores - ref_scores[i])
        j = int(np.argmin(dist))
        if np.abs(result.boxes[j] - box).max() > 0.1:
            continue
        matched += 1
        assert abs(result.scores[j] - ref_scores[i]) < 2e-4
        inter = (result.masks[j] & ref_masks[i]).sum()
        union = (result.masks[j] | ref_masks[i]).sum()
        assert inter / max(union, 1) >= 0.98
    assert matched >= 0.98 * len(ref_scores)


@pytest.mark.parametrize(
    "seed,image,imgsz",
    [
        (1, DATASETS / "grabcut" / "images" / "124080.jpg", 640),
        (2, DATASETS / "davis345" / "images" / "100.jpg", 800),
        (3, DATASETS / "grabcut" / "images" / "124080.jpg", 1024),
    ],
)
def test_everything_matches_ultralytics_on_other_weights_and_sizes(seed, image, imgsz):
    from segany.predict.fastsam import FastSam, FastSamSettings

    torch.set_num_threads(1)
    ref, ours = perturbed_reference(seed)
    rgb = load_rgb(image)
    out = ref.predict(np.ascontiguousarray(rgb[..., ::-1]), imgsz=imgsz, conf=0.4, iou=0.9, retina_masks=True,
                      device="cpu", verbose=False)[0]
    ref_boxes = out.boxes.xyxy.numpy() if out.boxes is not None else np.zeros((0, 4))
    ref_scores = out.boxes.conf.numpy() if out.boxes is not None else np.zeros(0)
    ref_masks = out.masks.data.numpy().astype(bool) if out.masks is not None else np.zeros((0,) + rgb.shape[:2], bool)
    result = FastSam(ours, FastSamSettings(imgsz=imgsz), mode="fast", bfloat16=False).everything(rgb)
    pair_and_compare(result, ref_boxes, ref_scores, ref_masks)


@pytest.mark.parametrize("scale,hw", [("s", (320, 448)), ("x", (256, 352))])
def test_network_matches_ultralytics_on_random_weights(scale, hw, tmp_path):
    """The unfused network against ultralytics' on freshly initialised weights of the s and x scales."""
    from segany.modeling.yolov8_seg import build_yolov8_seg, config_from_state_dict, yolov8_seg_config

    ul = ultralytics()
    import importlib.resources

    yaml_src = importlib.resources.files("ultralytics") / "cfg" / "models" / "v8" / "yolov8-seg.yaml"
    text = yaml_src.read_text().replace("nc: 80", "nc: 1")
    (tmp_path / f"yolov8{scale}-seg.yaml").write_text(text)
    torch.manual_seed(7)
    ref = ul.YOLO(str(tmp_path / f"yolov8{scale}-seg.yaml")).model.eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    sd = ref.state_dict()
    cfg = config_from_state_dict(sd)
    assert (cfg.widths, cfg.depths) == (yolov8_seg_config(scale).widths, yolov8_seg_config(scale).depths)
    ours = build_yolov8_seg(cfg)
    ours.load_state_dict(sd)
    x = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        (ref_pred, ref_protos), _ = ref(x)
        pred, protos = ours(x)
    torch.testing.assert_close(pred[:, 4:], ref_pred[:, 4:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pred[:, :4], ref_pred[:, :4], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(protos, ref_protos, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("image_hw,proto_hw", [((321, 481), (176, 256)), ((480, 854), (144, 256)),
                                               ((500, 375), (256, 192)), ((333, 333), (64, 64)),
                                               ((97, 640), (16, 160))])
def test_mask_assembly_identical_to_ultralytics(image_hw, proto_hw):
    """Same prototypes, coefficients and boxes -> bit-identical masks (every padding factor)."""
    from segany.predict.yolo_postprocess import assemble_masks

    ul = ultralytics()
    from ultralytics.utils import ops

    gen = torch.Generator().manual_seed(sum(image_hw))
    protos = torch.randn(32, *proto_hw, generator=gen)
    coefs = torch.randn(40, 32, generator=gen)
    h, w = image_hw
    xy = torch.rand(40, 2, generator=gen) * torch.tensor([w, h])
    wh = torch.rand(40, 2, generator=gen) * torch.tensor([w, h]) / 2
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1)
    ref = ops.process_mask_native(protos, coefs, boxes.clone(), image_hw).bool()
    ours, _ = assemble_masks(protos, coefs, boxes, image_hw)
    assert torch.equal(ours, ref)
