"""The released vit_b architecture with seeded random weights, run by the reference package and by segany
on a real image: same embedding, logits and IoU predictions. Slow (two vit_b encoder passes): heavy."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import segany
from segany.io.checkpoint import save_checkpoint
from segany.modeling import build_sam

from .conftest import case_image_path, import_reference, load_rgb, needs_shared

pytestmark = [pytest.mark.heavy, needs_shared]

LOGIT_ATOL = 1e-4
IOU_ATOL = 1e-5
EMBED_ATOL = 1e-4


def random_vit_b(seed: int) -> torch.nn.Module:
    """vit_b with every tensor random: the zero-initialised position tables too, so they matter, and
    the decoder's matrices doubled, since PyTorch's default init leaves the mask logits near zero."""
    from segany.modeling.common import LayerNorm2d

    torch.manual_seed(seed)
    model = build_sam("vit_b")
    with torch.no_grad():
        norms = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, LayerNorm2d))}
        for name, p in model.named_parameters():
            if id(p) in norms:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")) or p.ndim == 1:
                p.normal_(0.0, 0.02)
            elif name.startswith("mask_decoder."):
                p.mul_(2.0)
    return model.eval()


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    ref = import_reference("segment_anything")
    path = tmp_path_factory.mktemp("vit_b") / "sam_vit_b_random.pth"
    save_checkpoint(random_vit_b(seed=1234), path)
    image = load_rgb(case_image_path("grabcut_124080"))
    timings = {}
    start = time.perf_counter()
    ref_pred = ref.SamPredictor(ref.sam_model_registry["vit_b"](checkpoint=str(path)).eval())
    with torch.no_grad():
        ref_pred.set_image(image)
    timings["reference"] = time.perf_counter() - start
    start = time.perf_counter()
    ours = segany.SamPredictor(segany.load_model(path))
    ours.set_image(image)
    timings["segany"] = time.perf_counter() - start
    print(f"\nvit_b load + embed: reference {timings['reference']:.1f}s, segany {timings['segany']:.1f}s")
    return ref_pred, ours, image


DIFFS: dict = {}


def compare(name, ref_out, our_out, size, rng):
    ref_logits, ref_iou, ref_low = (np.asarray(x) for x in ref_out)
    logits, iou, low = our_out
    assert low.shape == ref_low.shape and iou.shape == ref_iou.shape and logits.shape == ref_logits.shape
    assert np.abs(ref_low).max() > 0.1, "logits near zero: the comparison would be vacuous"
    h, w = size
    ys, xs = rng.integers(0, h, 4000), rng.integers(0, w, 4000)
    d_low = float(np.abs(low - ref_low).max())
    d_full = float(np.abs(logits[..., ys, xs] - ref_logits[..., ys, xs]).max())
    d_iou = float(np.abs(iou - ref_iou).max())
    DIFFS[name] = (d_low, d_full, d_iou)
    print(f"{name}: low-res {d_low:.2e}, full-res sampled {d_full:.2e}, iou {d_iou:.2e}")
    assert d_low <= LOGIT_ATOL and d_full <= LOGIT_ATOL and d_iou <= IOU_ATOL
    confident = np.abs(ref_logits) > 1e-3
    assert np.array_equal((logits > 0)[confident], (ref_logits > 0)[confident])


def test_embedding(predictors):
    ref_pred, ours, _ = predictors
    d = float((ours.get_image_embedding() - ref_pred.get_image_embedding()).abs().max())
    print(f"embedding max diff {d:.2e}")
    assert d <= EMBED_ATOL


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("one_point_multimask", dict(point_coords=np.array([[240.0, 180.0]]), point_labels=np.array([1]), multimask_output=True)),
        ("box", dict(box=np.array([60.0, 40.0, 400.0, 300.0]), multimask_output=False)),
        ("box_multimask", dict(box=np.array([100.0, 80.0, 350.0, 280.0]), multimask_output=True)),
        ("box_and_negative_point", dict(point_coords=np.array([[300.0, 120.0]]), point_labels=np.array([0]),
                                        box=np.array([60.0, 40.0, 400.0, 300.0]), multimask_output=False)),
    ],
)
def test_single_prompts(predictors, name, kwargs):
    ref_pred, ours, image = predictors
    with torch.no_grad():
        ref_out = ref_pred.predict(return_logits=True, **kwargs)
    our_out = ours.predict(return_logits=True, **kwargs)
    compare(name, ref_out, our_out, image.shape[:2], np.random.default_rng(0))


def test_mask_input(predictors):
    ref_pred, ours, image = predictors
    pts, lbl = np.array([[240.0, 180.0], [120.0, 250.0]]), np.array([1, 1])
    with torch.no_grad():
        _, scores, low = ref_pred.predict(pts, lbl, multimask_output=True)
        best = low[np.argmax(scores)][None]
        ref_out = ref_pred.predict(pts, lbl, mask_input=best, multimask_output=False, return_logits=True)
    our_out = ours.predict(pts, lbl, mask_input=best, multimask_output=False, return_logits=True)
    compare("point_with_mask_input", ref_out, our_out, image.shape[:2], np.random.default_rng(1))


def test_batched_boxes(predictors):
    ref_pred, ours, image = predictors
    boxes = np.array([[60.0, 40.0, 400.0, 300.0], [10.0, 10.0, 200.0, 150.0], [220.0, 100.0, 470.0, 320.0]])
    with torch.no_grad():
        tb = ref_pred.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), image.shape[:2])
        masks, iou, low = ref_pred.predict_torch(None, None, boxes=tb, multimask_output=True, return_logits=True)
    our_out = ours.predict(box=boxes, multimask_output=True, return_logits=True)
    compare("batched_boxes", (masks.numpy(), iou.numpy(), low.numpy()), our_out, image.shape[:2], np.random.default_rng(2))
