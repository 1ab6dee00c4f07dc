"""Pre- and post-processing of YOLOv8-seg / FastSAM, as ultralytics 8.4.190's FastSAM predictor does it.

letterbox        -> the network input (minimal rectangle, multiple of 32, grey 114 padding)
select_candidates, nms -> detections (x1 y1 x2 y2 score class + mask coefficients) in letterbox pixels
boxes_to_image   -> boxes in original-image pixels, clipped
assemble_masks   -> masks at the original resolution (the reference's "retina masks")
snap_to_border, whole_image_rule -> FastSAM's final box adjustments
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

STRIDE = 32
PAD_VALUE = 114
MAX_NMS_CANDIDATES = 30000
CLASS_OFFSET = 7680  # separates the classes' boxes in one NMS pass (larger than any image side)


@dataclass
class Letterbox:
    """Where the image sits in the network input."""

    input_hw: Tuple[int, int]  # network input (H, W)
    image_hw: Tuple[int, int]  # original (h, w)
    new_hw: Tuple[int, int]  # the resized image inside the input
    pad_tblr: Tuple[int, int, int, int]


def check_imgsz(imgsz: int) -> int:
    """The inference size, rounded up to a multiple of the stride (as the reference does)."""
    if isinstance(imgsz, bool) or not isinstance(imgsz, (int, np.integer)) or imgsz < STRIDE:
        raise ValueError(f"imgsz must be an integer >= {STRIDE}, got {imgsz!r}")
    return int(math.ceil(int(imgsz) / STRIDE) * STRIDE)


def letterbox(image: np.ndarray, imgsz: int) -> Tuple[np.ndarray, Letterbox]:
    """Resize an (h, w, 3) uint8 image so that its longer side is imgsz (up or down), then pad each side
    to the next multiple of 32 (split evenly, one more row/column at the bottom/right)."""
    h, w = image.shape[:2]
    r = min(imgsz / h, imgsz / w)
    new_w, new_h = round(w * r), round(h * r)  # Python's round, half to even
    dw, dh = (imgsz - new_w) % STRIDE / 2, (imgsz - new_h) % STRIDE / 2
    if (new_w, new_h) != (w, h):
        # OpenCV's INTER_LINEAR on uint8 (fixed-point weights): the reference's exact pixels.
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    box = Letterbox((image.shape[0], image.shape[1]), (h, w), (new_h, new_w), (top, bottom, left, right))
    return np.ascontiguousarray(image), box


def to_input(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def xywh_to_xyxy(xywh: torch.Tensor) -> torch.Tensor:
    half_w, half_h = xywh[..., 2] / 2, xywh[..., 3] / 2
    return torch.stack((xywh[..., 0] - half_w, xywh[..., 1] - half_h, xywh[..., 0] + half_w, xywh[..., 1] + half_h), -1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int = 0) -> np.ndarray:
    """Greedy non-maximum suppression: visit boxes by descending score (stable), keep a box unless a kept
    one overlaps it with IoU > iou. Float32 areas and IoU, the threshold compared in float64.
    Returns the kept indices in score order (at most max_keep when > 0)."""
    boxes = np.asarray(boxes, dtype=np.float32)
    order = np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[order, k]) for k in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i])
        if max_keep and len(keep) >= max_keep:
            break
        rest = slice(i + 1, None)
        inter_w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        inter_h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = inter_w * inter_h
        overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= overlap.astype(np.float64) > iou
    return np.asarray(keep, dtype=np.int64)


@dataclass
class Detections:
    """NMS survivors: anchor indices, boxes (K, 4) xyxy in letterbox pixels, scores, classes, coefficients."""

    anchors: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    coefs: torch.Tensor


def detect(pred: torch.Tensor, conf: float, iou: float, max_det: int = 300, num_classes: int = 1) -> Detections:
    """One image's (4 + nc + nm, N) prediction -> candidates with score > conf -> NMS (per class)."""
    scores_all = pred[4 : 4 + num_classes]
    score, cls = scores_all.max(0)
    cand = torch.nonzero(score > conf).flatten()
    if len(cand) > MAX_NMS_CANDIDATES:
        cand = cand[score[cand].argsort(descending=True)[:MAX_NMS_CANDIDATES]]
    boxes = xywh_to_xyxy(pred[:4, cand].T)
    offset = cls[cand].to(boxes.dtype)[:, None] * CLASS_OFFSET
    keep = torch.from_numpy(nms((boxes + offset).numpy(), score[cand].numpy(), iou, max_det))
    idx = cand[keep]
    return Detections(
        anchors=idx, boxes=boxes[keep], scores=score[idx], classes=cls[idx], coefs=pred[4 + num_classes :, idx].T
    )


def boxes_to_image(boxes: torch.Tensor, lb: Letterbox) -> torch.Tensor:
    """Letterbox xyxy -> original-image xyxy (per-axis gains of the rounded resize), clipped to the image."""
    h, w = lb.image_hw
    top, _, left, _ = lb.pad_tblr
    new_h, new_w = lb.new_hw
    out = boxes.clone()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / (new_w / w)).clamp_(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / (new_h / h)).clamp_(0, h)
    return out


def _content_crop(mh: int, mw: int, h: int, w: int) -> Tuple[int, int, int, int]:
    """Rows and columns of an (mh, mw) map that hold the image (the rest is letterbox padding)."""
    gain = min(mh / h, mw / w)
    ch, cw = max(round(h * gain), 1), max(round(w * gain), 1)
    top, left = round((mh - ch) / 2 - 0.1), round((mw - cw) / 2 - 0.1)
    return top, top + ch, left, left + cw


def assemble_masks(protos: torch.Tensor, coefs: torch.Tensor, boxes: torch.Tensor, image_hw: Tuple[int, int],
                   stability_offset: float = 0.0, chunk_pixels: int = 16_000_000) -> Tuple[torch.Tensor, torch.Tensor]:
    """(nm, mh, mw) prototypes, (K, nm) coefficients, (K, 4) boxes in image pixels -> (K, h, w) bool masks.

    Logits = coefficients x prototypes; upsampled first by the smallest factor f (1, 2 or 4) that puts the
    letterbox padding on whole pixels, the padding cropped, resized (bilinear) to the image, > 0, then
    zeroed outside each box (pixel (y, x) kept when x1 <= x < x2 and y1 <= y < y2).

    With stability_offset > 0 also returns each mask's stability score (SAM's definition, threshold 0):
    area(logit > offset) / area(logit > -offset) inside the box; else an empty tensor."""
    h, w = image_hw
    nm, mh, mw = protos.shape
    masks = torch.zeros((len(coefs), h, w), dtype=torch.bool)
    stability = torch.zeros(len(coefs) if stability_offset > 0 else 0, dtype=torch.float32)
    if len(coefs) == 0:
        return masks, stability
    logits = (coefs.float() @ protos.float().reshape(nm, -1)).reshape(-1, mh, mw)
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    per_chunk = max(1, chunk_pixels // (h * w + f * f * mh * mw))
    cols = torch.arange(w, dtype=boxes.dtype)
    rows = torch.arange(h, dtype=boxes.dtype)
    for start in range(0, len(logits), per_chunk):
        sl = slice(start, start + per_chunk)
        part = logits[sl][None]  # (1, n, mh, mw)
        if f > 1:
            part = F.interpolate(part, scale_factor=f, mode="bilinear", align_corners=False)
        fh, fw = part.shape[2:]
        if (fh, fw) != (h, w):
            t, b, l, r = _content_crop(fh, fw, h, w)
            part = F.interpolate(part[..., t:b, l:r], (h, w), mode="bilinear", align_corners=False)
        part = part[0]  # (n, h, w)
        x1, y1, x2, y2 = (boxes[sl, k, None] for k in range(4))
        in_cols = ((cols >= x1) & (cols < x2))[:, None, :]  # (n, 1, w)
        in_rows = ((rows >= y1) & (rows < y2))[:, :, None]  # (n, h, 1)
        torch.gt(part, 0, out=masks[sl])
        masks[sl] &= in_cols  # the box is separable: no (n, h, w) box mask is built
        masks[sl] &= in_rows
        if stability_offset > 0:
            inside = in_cols & in_rows
            high = ((part > stability_offset) & inside).sum((1, 2))
            low = ((part > -stability_offset) & inside).sum((1, 2))
            stability[sl] = torch.where(low > 0, high.float() / low.clamp(min=1).float(), torch.zeros(()))
    return masks, stability


def _axis_map(m: int, f: int, crop: Tuple[int, int], out: int, resize: bool) -> torch.Tensor:
    """The linear map (out, m) that assemble_masks applies along one axis: upsample by f (bilinear,
    align_corners False), keep [crop), resize to `out`. Found by running those steps on the identity, so
    it is the same interpolation as the two-dimensional path (bilinear is separable)."""
    signal = torch.eye(m, dtype=torch.float32)[None]  # (1, m sources, m samples)
    if f > 1:
        signal = F.interpolate(signal, scale_factor=f, mode="linear", align_corners=False)
    if resize:
        signal = F.interpolate(signal[..., crop[0] : crop[1]], size=out, mode="linear", align_corners=False)
    return signal[0].T.contiguous()  # (out, m)


def _taps(weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """An (out, m) interpolation map as consecutive taps: each output's first source index (out,) and the
    weights of the `spread` sources from there (out, spread); taps past the map's end weigh 0."""
    out, m = weights.shape
    nonzero = weights != 0
    first = nonzero.float().argmax(1)
    last = m - 1 - nonzero.flip(1).float().argmax(1)
    offsets = torch.arange(int((last - first).max()) + 1)
    index = first[:, None] + offsets
    taps = torch.where(index < m, weights.gather(1, index.clamp(max=m - 1)), torch.zeros(()))
    return first, taps


def _interpolate_rows(src: torch.Tensor, src_start: torch.Tensor, out_index: torch.Tensor, first: torch.Tensor,
                      taps: torch.Tensor) -> torch.Tensor:
    """One axis of the interpolation, batched: src (n, s, c) holds rows src_start[j] .. + s of each item's
    map; output row i of item j = sum over t of taps[out_index[j, i], t] * src[j, first[out_index[j, i]] + t].
    Returns (n, len(out_index[0]), c)."""
    n, s, c = src.shape
    flat = src.reshape(n * s, c)
    rows = out_index.shape[1]
    base = first[out_index] - src_start[:, None] + torch.arange(n)[:, None] * s  # (n, rows)
    index = (base.reshape(-1, 1) + torch.arange(taps.shape[1])).clamp(0, n * s - 1)  # taps beyond the band weigh 0
    # one weighted sum of whole rows per output row (embedding_bag: no per-tap intermediates)
    result = F.embedding_bag(index, flat, per_sample_weights=taps[out_index].reshape(index.shape), mode="sum")
    return result.view(n, rows, c)


def assemble_masks_in_boxes(protos: torch.Tensor, coefs: torch.Tensor, boxes: torch.Tensor, image_hw: Tuple[int, int],
                            stability_offset: float = 0.0, chunk_pixels: int = 8_000_000, max_chunk: int = 32
                            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """assemble_masks computed only inside each box (fast mode): the same masks up to float32 rounding.

    The upsample-crop-resize chain is one linear map per axis (each output row or column reads at most
    three consecutive prototype rows or columns), so a mask's pixels inside its box come from the
    prototype band under the box: interpolated across (columns), then down (rows). Masks are batched in
    chunks of similar box size; nothing outside the boxes is computed. Returns (masks, stability,
    nonempty)."""
    h, w = image_hw
    nm, mh, mw = protos.shape
    n_masks = len(coefs)
    # numpy's zeros come from calloc: pages no box touches are never written
    masks = torch.from_numpy(np.zeros((n_masks, h, w), dtype=bool))
    stability = torch.zeros(n_masks if stability_offset > 0 else 0, dtype=torch.float32)
    nonempty = torch.zeros(n_masks, dtype=torch.bool)
    if n_masks == 0:
        return masks, stability, nonempty
    gain = min(4 * mh / h, 4 * mw / w)
    pad = (4 * mh - max(round(h * gain), 1)) | (4 * mw - max(round(w * gain), 1))
    f = 4 // math.gcd(4, pad | pad // 2)
    resize = (f * mh, f * mw) != (h, w)
    t, b, l, r = _content_crop(f * mh, f * mw, h, w)
    row_first, row_taps = _taps(_axis_map(mh, f, (t, b), h, resize))  # (h,), (h, spread)
    col_first, col_taps = _taps(_axis_map(mw, f, (l, r), w, resize))
    logits = (coefs.float() @ protos.float().reshape(nm, -1)).reshape(n_masks, mh, mw)
    # pixel (y, x) is in the box when x1 <= x < x2 and y1 <= y < y2: integer ranges [ceil(x1), ceil(x2))
    x0, y0, x1, y1 = (boxes[:, k].float().ceil().long() for k in range(4))
    x0, x1 = x0.clamp(0, w), x1.clamp(0, w)
    y0, y1 = y0.clamp(0, h), y1.clamp(0, h)
    heights, widths = (y1 - y0).clamp(min=0), (x1 - x0).clamp(min=0)
    order = torch.argsort(heights * widths, stable=True)
    order = order[(heights * widths)[order] > 0]
    sorted_h, sorted_w = heights[order].tolist(), widths[order].tolist()
    corners = list(zip(y0.tolist(), x0.tolist()))
    box_hw = list(zip(heights.tolist(), widths.tolist()))
    spread_r, spread_c = row_taps.shape[1], col_taps.shape[1]
    start = 0
    while start < len(order):
        # grow the chunk while its padded size stays within the pixel budget and wastes little padding
        stop, hb, wb, area = start + 1, sorted_h[start], sorted_w[start], sorted_h[start] * sorted_w[start]
        while stop < len(order) and stop - start < max_chunk:
            nh, nw = max(hb, sorted_h[stop]), max(wb, sorted_w[stop])
            grown = area + sorted_h[stop] * sorted_w[stop]
            if (stop + 1 - start) * nh * nw > min(chunk_pixels, 1.5 * grown):
                break
            stop, hb, wb, area = stop + 1, nh, nw, grown
        idx = order[start:stop]
        start = stop
        # (n, hb) output rows and (n, wb) columns of each box; a smaller box's padding repeats its last one
        ys = y0[idx, None] + torch.minimum(torch.arange(hb), heights[idx, None] - 1)
        xs = x0[idx, None] + torch.minimum(torch.arange(wb), widths[idx, None] - 1)
        # the prototype band under each box, shifted to lie inside the map
        src_rows = min(mh, int((row_first[ys[:, -1]] - row_first[ys[:, 0]]).max()) + spread_r)
        src_cols = min(mw, int((col_first[xs[:, -1]] - col_first[xs[:, 0]]).max()) + spread_c)
        r0 = row_first[ys[:, 0]].clamp(max=mh - src_rows)
        c0 = col_first[xs[:, 0]].clamp(max=mw - src_cols)
        band = logits[idx[:, None, None], (r0[:, None] + torch.arange(src_rows))[:, :, None],
                      (c0[:, None] + torch.arange(src_cols))[:, None, :]]  # (n, sr, sc)
        across = _interpolate_rows(band.transpose(1, 2).contiguous(), c0, xs, col_first, col_taps)  # (n, wb, sr)
        crop = _interpolate_rows(across.transpose(1, 2).contiguous(), r0, ys, row_first, row_taps)  # (n, hb, wb)
        bits = crop > 0
        if stability_offset > 0:
            inside = (torch.arange(hb) < heights[idx, None])[:, :, None] & (torch.arange(wb) < widths[idx, None])[:, None, :]
            high = ((crop > stability_offset) & inside).sum((1, 2))
            low = ((crop > -stability_offset) & inside).sum((1, 2))
            stability[idx] = torch.where(low > 0, high.float() / low.clamp(min=1).float(), torch.zeros(()))
        filled = (crop.flatten(1).amax(1) > 0).tolist()  # (the padding repeats the box's own pixels)
        for j, k in enumerate(idx.tolist()):  # copies only: each box's pixels to their place
            top, left = corners[k]
            masks[k, top : top + box_hw[k][0], left : left + box_hw[k][1]] = bits[j, : box_hw[k][0], : box_hw[k][1]]
            nonempty[k] = filled[j]
    return masks, stability, nonempty


def snap_to_border(boxes: torch.Tensor, image_hw: Tuple[int, int], threshold: float = 20) -> torch.Tensor:
    """FastSAM: box sides within `threshold` px of the image border are moved onto it."""
    h, w = image_hw
    out = boxes.clone()
    out[out[:, 0] < threshold, 0] = 0
    out[out[:, 1] < threshold, 1] = 0
    out[out[:, 2] > w - threshold, 2] = w
    out[out[:, 3] > h - threshold, 3] = h
    return out


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def whole_image_rule(boxes: torch.Tensor, image_hw: Tuple[int, int], iou: float = 0.9) -> torch.Tensor:
    """FastSAM: a box covering the image with IoU > iou becomes exactly the whole image."""
    h, w = image_hw
    full = torch.tensor([[0, 0, w, h]], dtype=torch.float32)
    out = boxes.clone()
    if len(out):
        out[box_iou(full, out.float())[0] > iou] = full[0].to(out.dtype)
    return out
