"""The predictors on a CUDA GPU (skipped where PyTorch sees none): SAM, MobileSAM and HQ-SAM in both
modes through every prompt path, the batched decoder and everything mode with a crop layer. Exact mode
on the GPU agrees with exact mode on the CPU; fast mode (bfloat16) stays within its agreement limits."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import segany
from segany.eval.metrics import iou as mask_iou
from segany.modeling import ImageEncoderConfig, SamConfig, build_sam
from segany.engine import make_fast
from segany.modeling.hq_sam import build_hq_sam
from segany.modeling.tiny_vit import mobile_sam_config

from .smallsam import make_image
from .test_fast import IOU_MIN, REL_L2_MAX, agreement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (PyTorch sees none)")

IMAGE_SIZE = (300, 500)  # (H, W): landscape, padded at the bottom
LOGIT_ATOL = 2e-3  # float32 on the GPU sums in other orders than the CPU


def _small_sam(variant: str = "sam") -> torch.nn.Module:
    """The released decoder and prompt encoder (1024 input) on a 2-block ViT; `variant` "hq" adds HQ-SAM's
    token and fusion; "vit_t" is MobileSAM's TinyViT. Decoder weights doubled so logits vary."""
    torch.manual_seed(0)
    if variant == "vit_t":
        model = build_sam(mobile_sam_config())
    else:
        cfg = SamConfig(encoder=ImageEncoderConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)))
        model = build_hq_sam(cfg) if variant == "hq" else build_sam(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("mask_decoder.") and p.ndim > 1:
                p.mul_(2.0)
    return model.eval()


def _prompt_outputs(predictor: segany.SamPredictor, image: np.ndarray) -> dict:
    """Low-res logits of each prompt path (and the full-size masks' shape and type)."""
    h, w = image.shape[:2]
    predictor.set_image(image)
    out = {}
    masks, scores, low = predictor.predict(point_coords=[[w * 0.4, h * 0.5]], point_labels=[1])
    # (3 masks; HQ-SAM's multimask output is the best of them merged with its HQ mask, as released)
    assert masks.shape[1:] == (h, w) and masks.dtype == bool and scores.shape == masks.shape[:1]
    out["point"] = low
    _, _, out["point_box_single"] = predictor.predict(
        point_coords=[[w * 0.5, h * 0.5]], point_labels=[0], box=[w * 0.2, h * 0.2, w * 0.8, h * 0.9],
        multimask_output=False,
    )
    # The same mask prompt for every predictor (a disc of logits +-4), so that errors do not compound.
    yy, xx = np.mgrid[0:256, 0:256]
    disc = np.where((xx - 100) ** 2 + (yy - 70) ** 2 < 40**2, 4.0, -4.0).astype(np.float32)[None]
    _, _, out["mask_input"] = predictor.predict(point_coords=[[w * 0.4, h * 0.5]], point_labels=[1], mask_input=disc)
    coords = torch.tensor([[[w * 0.3, h * 0.3]], [[w * 0.7, h * 0.6]]], device=predictor.device)
    coords = predictor.transform.apply_coords_torch(coords, (h, w)).to(predictor.device)
    labels = torch.ones(2, 1, dtype=torch.int, device=predictor.device)
    batch_masks, _, batch_low = predictor.predict_torch(coords, labels, multimask_output=True)
    assert batch_masks.shape == (2, len(masks), h, w) and batch_masks.device.type == predictor.device.type
    out["batch"] = batch_low.float().cpu().numpy()
    return out


@pytest.mark.parametrize("variant", ["sam", "vit_t", "hq"])
def test_predictor_paths_on_the_gpu_agree_with_the_cpu(variant, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    image = make_image(*IMAGE_SIZE)
    model = _small_sam(variant)
    cpu = _prompt_outputs(segany.SamPredictor(copy.deepcopy(model)), image)
    gpu_exact = _prompt_outputs(segany.SamPredictor(copy.deepcopy(model).cuda()), image)
    gpu_fast = _prompt_outputs(segany.SamPredictor(make_fast(copy.deepcopy(model).cuda())), image)
    for path, expected in cpu.items():
        np.testing.assert_allclose(gpu_exact[path], expected, atol=LOGIT_ATOL, rtol=0, err_msg=path)
        rel, iou = agreement(gpu_exact[path], gpu_fast[path])
        assert rel < REL_L2_MAX and iou >= IOU_MIN, (path, rel, iou)


def _generate(model: torch.nn.Module, image: np.ndarray) -> list:
    from segany.predict.amg import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(
        model, points_per_side=8, crop_n_layers=1, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        box_nms_thresh=0.9, crop_nms_thresh=0.9, min_mask_region_area=20,
    )
    return generator.generate(image)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_everything_mode_with_a_crop_layer_on_the_gpu(mode, monkeypatch):
    """Everything mode on the GPU (the batch decoded at once, stability scored there) finds what it finds
    on the CPU: in exact mode the same masks (IoU >= 0.98 each, the scores within 1e-3), in fast mode
    each GPU mask matches a CPU exact one (IoU >= 0.8: this random model's logits are mostly near zero,
    where bfloat16 rounding flips pixels; the logits' agreement is checked by the predictor test)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    image = make_image(*IMAGE_SIZE)
    cpu = _generate(_small_sam(), image)
    model = _small_sam().cuda()
    gpu = _generate(make_fast(model) if mode == "fast" else model, image)
    assert cpu and gpu, "no masks at all with every threshold at zero"
    for record in gpu:
        assert record["segmentation"].shape == IMAGE_SIZE and record["segmentation"].dtype == bool
        assert record["area"] == int(record["segmentation"].sum())
        x, y, bw, bh = record["bbox"]
        assert 0 <= x and 0 <= y and x + bw <= IMAGE_SIZE[1] and y + bh <= IMAGE_SIZE[0]
        best = max(range(len(cpu)), key=lambda j: mask_iou(record["segmentation"], cpu[j]["segmentation"]))
        assert mask_iou(record["segmentation"], cpu[best]["segmentation"]) >= (0.98 if mode == "exact" else 0.8)
        if mode == "exact":
            assert abs(record["predicted_iou"] - cpu[best]["predicted_iou"]) < 1e-3
            assert abs(record["stability_score"] - cpu[best]["stability_score"]) < 1e-2
    if mode == "exact":
        assert len(gpu) == len(cpu)
