"""Pre- and post-processing between image pixels and the model's 1024-square input frame.

No torchvision: PIL does the image resize (bilinear, as the released code does through
torchvision's PIL path), torch does tensor resizes.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..modeling.sam import low_res_region


def preprocess_shape(height: int, width: int, long_side: int) -> Tuple[int, int]:
    """Size after scaling the longest side to `long_side` (rounded half up)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class ResizeLongestSide:
    """Resizes images and prompt coordinates so the longest side is `target_length`."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> resized uint8 array."""
        h, w = preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def _scale(self, original_size: Tuple[int, int]) -> Tuple[float, float]:
        old_h, old_w = original_size
        new_h, new_w = preprocess_shape(old_h, old_w, self.target_length)
        return new_w / old_w, new_h / old_h

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        sx, sy = self._scale(original_size)
        coords = np.array(coords, dtype=float, copy=True)
        coords[..., 0] = coords[..., 0] * sx
        coords[..., 1] = coords[..., 1] * sy
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Tuple[int, int]) -> torch.Tensor:
        sx, sy = self._scale(original_size)
        coords = coords.clone().to(torch.float)
        coords[..., 0] = coords[..., 0] * sx
        coords[..., 1] = coords[..., 1] * sy
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float -> resized with antialiased bilinear interpolation."""
        h, w = preprocess_shape(image.shape[2], image.shape[3], self.target_length)
        return F.interpolate(image, (h, w), mode="bilinear", align_corners=False, antialias=True)


def upscale_logits_opencv(
    low_res: torch.Tensor,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    image_size: int,
    threshold: Optional[float] = None,
) -> torch.Tensor:
    """Sam.postprocess_masks (low-res logits (..., h, w) -> logits at the original image size) with
    OpenCV's bilinear resize: the same two steps (upsample to the model's input frame, drop the padding,
    resize to the original size), each mask on its own, about 4x faster on a CPU than PyTorch's kernel.

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
