"""The masks' resize from the decoder's low-res logits to the image: OpenCV's bilinear resize, or the
compiled composite of the released two bilinear steps (csrc/decoder_bf16.c). The fast mode's; the
exact mode keeps Sam.postprocess_masks."""
from __future__ import annotations

import ctypes
import functools
import threading
from typing import Optional, Tuple

import cv2
import numpy as np
import torch

from . import native
from .sam import low_res_region


def upscale_logits_opencv(
    low_res: torch.Tensor,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
    threshold: Optional[float] = None,
) -> torch.Tensor:
    """Sam.postprocess_masks (low-res logits (..., h, w) -> logits at the original image size) with
    OpenCV's bilinear resize: the same two steps (upsample to the model's input frame, drop the padding,
    resize to the original size), each mask on its own, faster on a CPU than PyTorch's kernel.

    OpenCV computes the sample positions in its own float arithmetic, so values differ from PyTorch's by
    up to ~1e-4 (relative ~1e-5): within the noise of the fast mode (bfloat16), which uses this; the
    exact mode keeps Sam.postprocess_masks.

    threshold: return the masks logits > threshold (bool) instead, each mask thresholded as it is
    resized (no full-size float copy of all of them)."""
    low_h, low_w = low_res.shape[-2:]
    in_h, in_w = int(input_size[0]), int(input_size[1])
    out_h, out_w = int(original_size[0]), int(original_size[1])
    region = low_res_region((low_h, low_w), image_size, input_size)
    if region is None:
        raise ValueError(f"low-res size {(low_h, low_w)} does not divide the input size {image_size}")
    # Only the rows/columns the un-padded region needs, as Sam.postprocess_masks.
    factor_h, factor_w, need_h, need_w = region
    masks = low_res.detach().to("cpu", torch.float32).reshape(-1, low_h, low_w).numpy()
    out = np.empty((masks.shape[0], out_h, out_w), np.float32 if threshold is None else bool)
    # The intermediate frames go into work buffers kept for this thread's next call: the first step
    # into a fresh array took 76 us per mask here against 46 us into a kept one.
    up = _scratch("up", (need_h * factor_h, need_w * factor_w))
    resized = _scratch("resized", (out_h, out_w)) if threshold is not None else None
    for mask, target in zip(masks, out):
        # (OpenCV returns the array it wrote: `up` itself, as its size and type match.)
        frame = cv2.resize(np.ascontiguousarray(mask[:need_h, :need_w]), up.shape[::-1], dst=up, interpolation=cv2.INTER_LINEAR)
        cv2.resize(frame[:in_h, :in_w], (out_w, out_h), dst=target if threshold is None else resized, interpolation=cv2.INTER_LINEAR)
        if threshold is not None:
            np.greater(resized, threshold, out=target)
    return torch.from_numpy(out).view(*low_res.shape[:-2], out_h, out_w)


def upscale_logits_native(
    low_res: torch.Tensor,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
    threshold: Optional[float] = None,
) -> Optional[torch.Tensor]:
    """resize_natively with this process's kernels, for callers outside an engine: None where they did
    not load here, or low_res is not on a CPU."""
    lib = native.library()
    if lib is None or low_res.device.type != "cpu":
        return None
    return resize_natively(lib, low_res, input_size, original_size, image_size, threshold)


def resize_natively(
    lib: ctypes.CDLL,
    low_res: torch.Tensor,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
    threshold: Optional[float] = None,
) -> Optional[torch.Tensor]:
    """Sam.postprocess_masks (and the threshold, if given) through segany's compiled kernel: the two
    bilinear steps as their composite, three low-res taps per output row and column (weights from
    the released steps' own sample positions, see _composite_taps), with no full-size intermediate;
    values within float32 rounding of the two steps'. low_res on a CPU, `lib` the loaded kernels
    (segany.engine.native; an engine passes those it was built with). None where the kernel does not
    apply (an image narrower than the low-res map's region: more than 16 low-res columns
    under 16 output columns), for the caller's other path."""
    low_h, low_w = low_res.shape[-2:]
    if low_w > 1024 or low_res_region((low_h, low_w), image_size, input_size) is None:
        return None
    out_h, out_w = int(original_size[0]), int(original_size[1])
    taps = _composite_taps(int(low_h), int(low_w), int(image_size), int(input_size[0]), int(input_size[1]), out_h, out_w)
    if taps is None:
        return None
    rows, row_w, col_base, col_off, col_w = taps
    masks = low_res.detach().to(torch.float32).reshape(-1, low_h, low_w).contiguous()
    count = masks.shape[0]
    out = torch.empty((count, out_h, out_w), dtype=torch.float32 if threshold is None else torch.bool)
    if count:
        lib.segany_resize_masks(
            masks.data_ptr(), count, low_h, low_w, rows.ctypes.data, row_w.ctypes.data, col_base.ctypes.data,
            col_off.ctypes.data, col_w.ctypes.data, out_h, out_w, 0.0 if threshold is None else float(threshold),
            int(threshold is not None), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    return out.view(*low_res.shape[:-2], out_h, out_w)


def _bilinear_sources(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear sample positions (align_corners=False, no antialias), in its float32
    arithmetic: for each output index the two input indices and the second one's weight."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    weight = np.clip(source - first.astype(np.float32), 0, 1).astype(np.float32)
    return first, second, weight


def _axis_taps(low: int, frame: int, cropped: int, out: int) -> Tuple[np.ndarray, np.ndarray]:
    """One axis of the two steps (low -> frame, crop to `cropped`, -> out) as three consecutive low
    taps per output: (first tap's index (out,), weights (out, 3))."""
    up_first, up_second, up_weight = _bilinear_sources(low, frame)
    k0, k1, weight2 = _bilinear_sources(cropped, out)
    base = up_first[k0]
    weights = np.zeros((out, 3), np.float64)
    rows = np.arange(out)
    for k, outer in ((k0, 1.0 - weight2.astype(np.float64)), (k1, weight2.astype(np.float64))):
        inner = up_weight[k].astype(np.float64)
        for index, w in ((up_first[k], 1.0 - inner), (up_second[k], inner)):
            offset = index - base
            if offset.min() < 0 or offset.max() > 2:
                raise AssertionError("a bilinear step read outside its neighbours")  # (cannot happen)
            np.add.at(weights, (rows, offset), outer * w)
    return base, weights.astype(np.float32)


@functools.lru_cache(maxsize=32)
def _composite_taps(low_h: int, low_w: int, image_size: int, in_h: int, in_w: int, out_h: int, out_w: int):
    """The kernel's tables for one geometry (see segany_resize_masks in csrc/decoder_bf16.c), or None
    where 16 output columns would read more than 16 low-res columns."""
    row_base, row_w = _axis_taps(low_h, image_size, in_h, out_h)
    rows = np.minimum(row_base[:, None] + np.arange(3), low_h - 1).astype(np.int32)  # (unused taps: weight 0)
    col_first, col_w3 = _axis_taps(low_w, image_size, in_w, out_w)
    blocks = -(-out_w // 16)
    padded = blocks * 16
    first = np.concatenate([col_first, np.full(padded - out_w, col_first[-1])])
    weights = np.zeros((3, padded), np.float32)
    weights[:, :out_w] = col_w3.T
    col_base = first.reshape(blocks, 16).min(1)
    offsets = first[None, :] + np.arange(3)[:, None] - np.repeat(col_base, 16)[None, :]
    offsets = np.where(weights != 0, offsets, 0)
    if offsets.max() > 15:
        return None
    return (
        np.ascontiguousarray(rows),
        np.ascontiguousarray(row_w),
        np.ascontiguousarray(col_base, dtype=np.int32),
        np.ascontiguousarray(offsets, dtype=np.int32),
        np.ascontiguousarray(weights),
    )


_SCRATCH = threading.local()


# Work buffers larger than this (a photo of tens of megapixels) are not kept between calls.
SCRATCH_KEPT_BYTES = 16 << 20


def _scratch(name: str, shape: Tuple[int, int]) -> np.ndarray:
    """A float32 work buffer of `shape` (contents undefined), this thread's own, kept between calls
    up to SCRATCH_KEPT_BYTES."""
    if shape[0] * shape[1] * 4 > SCRATCH_KEPT_BYTES:
        return np.empty(shape, np.float32)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.shape != shape:
        buffer = buffers[name] = np.empty(shape, np.float32)
    return buffer
