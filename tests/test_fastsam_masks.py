"""FastSAM's fast mask assembly (only inside each box) against the full-resolution path it replaces."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segany.predict.yolo_postprocess import Letterbox, assemble_masks, assemble_masks_in_boxes, letterbox


def geometry(h: int, w: int, imgsz: int):
    lb: Letterbox = letterbox(np.zeros((h, w, 3), np.uint8), imgsz)[1]
    return lb.input_hw[0] // 4, lb.input_hw[1] // 4


def random_case(seed: int, h: int, w: int, imgsz: int, n: int):
    g = torch.Generator().manual_seed(seed)
    mh, mw = geometry(h, w, imgsz)
    protos = torch.randn(32, mh, mw, generator=g)
    # smooth prototypes too (large regions of one sign, as trained masks have), mixed with noise
    protos[:16] = torch.nn.functional.avg_pool2d(protos[:16][None], 5, 1, 2)[0] * 3
    coefs = torch.randn(n, 32, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    wh = torch.rand(n, 2, generator=g) ** 2 * torch.tensor([w, h])
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, w)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, h)
    # edge cases: the whole image, an empty box, a one-pixel box, integer and just-below-integer corners
    boxes[0] = torch.tensor([0, 0, w, h])
    boxes[1] = torch.tensor([5.0, 5.0, 5.0, 9.0])
    boxes[2] = torch.tensor([w - 1.0, h - 1.0, w, h])
    boxes[3] = torch.tensor([10.0, 3.0, 20.0, 7.0])
    boxes[4] = torch.tensor([9.999, 2.999, 20.001, 7.001])
    return protos, coefs, boxes


# padding factors 1, 2 and 4 (see assemble_masks), landscape, portrait, a small image upscaled
@pytest.mark.parametrize("h, w, imgsz", [(480, 854, 1024), (321, 481, 1024), (500, 375, 640), (77, 130, 320), (600, 600, 800)])
def test_masks_in_boxes_equal_full_resolution_masks(h, w, imgsz):
    protos, coefs, boxes = random_case(h * w, h, w, imgsz, 40)
    full, full_stability = assemble_masks(protos, coefs, boxes, (h, w), stability_offset=1.0)
    boxed, stability, nonempty = assemble_masks_in_boxes(protos, coefs, boxes, (h, w), stability_offset=1.0)
    assert boxed.shape == full.shape and boxed.dtype == torch.bool
    # float32 rounding of a different summation order may flip a pixel whose logit is ~1e-7 from 0
    assert int((boxed != full).sum()) <= 2
    np.testing.assert_array_equal(nonempty.numpy(), full.flatten(1).any(1).numpy())
    assert float((stability - full_stability).abs().max()) < 1e-3
    assert not boxed[1].any()  # the empty box
    # no pixel outside its box
    ys, xs = torch.arange(h)[:, None], torch.arange(w)[None, :]
    for k in range(len(boxes)):
        x1, y1, x2, y2 = boxes[k]
        outside = ~((xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2))
        assert not boxed[k][outside].any()


def test_masks_in_boxes_without_detections():
    protos = torch.randn(32, 120, 256)
    masks, stability, nonempty = assemble_masks_in_boxes(protos, torch.zeros(0, 32), torch.zeros(0, 4), (480, 1024))
    assert masks.shape == (0, 480, 1024) and len(stability) == 0 and len(nonempty) == 0


def test_masks_in_boxes_chunking_does_not_change_the_result():
    protos, coefs, boxes = random_case(7, 321, 481, 1024, 30)
    a = assemble_masks_in_boxes(protos, coefs, boxes, (321, 481))[0]
    b = assemble_masks_in_boxes(protos, coefs, boxes, (321, 481), chunk_pixels=1, max_chunk=1)[0]
    assert torch.equal(a, b)
