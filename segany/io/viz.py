"""Pictures of masks and prompts: colour overlays, transparent cut-outs, prompt markers, PNG writing.

All functions take and return HxWx3 (or HxWx4) uint8 arrays in RGB order and never modify their input.

    overlay = overlay_masks(image, masks)            # any number of (H, W) bool masks
    overlay = draw_prompts(overlay, points, labels, box)
    save_png("overlay.png", overlay)
"""
from __future__ import annotations

import io
import os
from typing import Any, Optional, Tuple, Union

import cv2
import numpy as np

from .atomic import atomic_write_bytes

PathLike = Union[str, os.PathLike]
Color = Tuple[int, int, int]

FOREGROUND: Color = (40, 220, 60)  # green: label 1
BACKGROUND: Color = (235, 40, 40)  # red: label 0
BOX_COLOR: Color = (60, 140, 255)

_GOLDEN = 0.618033988749895


def palette(n: int, seed_hue: float = 0.12) -> np.ndarray:
    """`n` distinct, deterministic RGB colours (n, 3) uint8.

    Hues step by the golden ratio so that neighbouring indices are far apart on the colour wheel and a
    mask keeps its colour however many masks follow it.
    """
    if n <= 0:
        return np.zeros((0, 3), np.uint8)
    i = np.arange(n)
    hue = (seed_hue + i * _GOLDEN) % 1.0
    # Alternate saturation/value a little so that colours with close hues stay distinguishable.
    sat = np.where(i % 2 == 0, 0.85, 0.65)
    val = np.where((i // 2) % 2 == 0, 0.95, 0.80)
    hsv = np.stack([hue * 180.0, sat * 255.0, val * 255.0], axis=-1).astype(np.uint8)[None]  # (1, n, 3)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def _check_image(image: Any) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must have shape HxWx3 (RGB), got {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def _check_masks(masks: Any, size: Tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool from one (H, W) mask, an (N, H, W) array or a sequence of (H, W) masks."""
    if isinstance(masks, (list, tuple)):
        masks = np.stack([np.asarray(m) for m in masks]) if len(masks) else np.zeros((0, *size), bool)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim == 4 and masks.shape[1] == 1:  # (N, 1, H, W) as models return them
        masks = masks[:, 0]
    if masks.ndim != 3 or masks.shape[1:] != tuple(size):
        raise ValueError(f"masks must be (H, W) or (N, H, W) with H, W = {tuple(size)}, got {masks.shape}")
    return masks > 0 if masks.dtype != bool else masks


def _check_colors(colors: Any, n: int) -> np.ndarray:
    if colors is None:
        return palette(n)
    colors = np.asarray(colors)
    if colors.ndim == 1:  # one colour for every mask
        colors = np.broadcast_to(colors, (n, colors.shape[0]))
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] < n:
        raise ValueError(f"colors must be one RGB triple or one per mask ({n}), got shape {colors.shape}")
    if colors.dtype.kind == "f" and colors.max(initial=0) <= 1.0:  # 0-1 floats as matplotlib uses
        colors = colors * 255.0
    return np.clip(np.round(colors[:n]), 0, 255).astype(np.uint8)


def mask_outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool: the pixels on the inner border of `mask`, `width` pixels thick."""
    m = mask.astype(np.uint8)
    if width <= 0 or not m.any():
        return np.zeros(mask.shape, bool)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    # Pad with zeros so a mask touching the image edge gets an outline along the edge too.
    eroded = cv2.erode(m, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return (m > 0) & (eroded == 0)


def overlay_masks(
    image: Any,
    masks: Any,
    colors: Optional[Any] = None,
    alpha: float = 0.5,
    outline: bool = True,
    outline_width: int = 2,
) -> np.ndarray:
    """The image with each mask tinted in its own colour (later masks on top) and outlined: HxWx3 uint8.

    masks: (H, W), (N, H, W) or a list of (H, W) arrays (bool, or anything > 0 is inside).
    colors: None for the default palette, one RGB triple, or one per mask (0-255 ints or 0-1 floats).
    """
    base = _check_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    size = base.shape[:2]
    masks = _check_masks(masks, size)
    colors = _check_colors(colors, len(masks)).astype(np.float32)
    out = base.astype(np.float32)
    for mask, color in zip(masks, colors):
        out[mask] = out[mask] * (1.0 - alpha) + color * alpha
    if outline:
        for mask, color in zip(masks, colors):
            out[mask_outline(mask, outline_width)] = color
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def mask_bbox(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) with exclusive x1/y1 of the mask's pixels, or None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def cutout_rgba(image: Any, mask: Any, crop_to_mask: bool = True) -> np.ndarray:
    """The masked object on a transparent background: HxWx4 uint8 (alpha 255 inside, 0 outside).

    With crop_to_mask the result is cut to the mask's bounding box; an empty mask then gives the
    full-size, fully transparent image (there is nothing to crop to).
    """
    base = _check_image(image)
    mask = _check_masks(mask, base.shape[:2])
    if len(mask) != 1:
        raise ValueError(f"cutout_rgba takes one (H, W) mask, got {len(mask)}")
    mask = mask[0]
    rgba = np.dstack([base, np.where(mask, 255, 0).astype(np.uint8)])
    rgba[~mask, :3] = 0  # no colour hidden behind transparent pixels (smaller files, no halo on resize)
    if crop_to_mask:
        bbox = mask_bbox(mask)
        if bbox is not None:
            x0, y0, x1, y1 = bbox
            rgba = rgba[y0:y1, x0:x1]
    return np.ascontiguousarray(rgba)


def draw_prompts(
    image: Any,
    points: Optional[Any] = None,
    labels: Optional[Any] = None,
    box: Optional[Any] = None,
    marker_radius: Optional[int] = None,
    line_width: Optional[int] = None,
) -> np.ndarray:
    """The image with prompt points (green = foreground 1, red = background 0, white rim) and boxes.

    points (K, 2) x, y in pixels; labels (K,) (all foreground when left out); box (4,) or (N, 4) as
    x0, y0, x1, y1. Sizes scale with the image unless given.
    """
    out = _check_image(image).copy()
    h, w = out.shape[:2]
    scale = max(h, w)
    radius = marker_radius if marker_radius is not None else max(3, round(scale / 100))
    width = line_width if line_width is not None else max(1, round(scale / 300))
    if box is not None:
        boxes = np.asarray(box, dtype=np.float64).reshape(-1, 4)
        for x0, y0, x1, y1 in np.round(boxes).astype(int):
            cv2.rectangle(out, (int(x0), int(y0)), (int(x1), int(y1)), BOX_COLOR, width, cv2.LINE_AA)
    if points is not None:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        labels = np.ones(len(points), int) if labels is None else np.asarray(labels).reshape(-1)
        if len(labels) != len(points):
            raise ValueError(f"{len(points)} points but {len(labels)} labels")
        for (x, y), label in zip(np.round(points).astype(int), labels):
            color = FOREGROUND if label == 1 else BACKGROUND
            center = (int(x), int(y))
            cv2.circle(out, center, radius + max(1, width), (255, 255, 255), -1, cv2.LINE_AA)
            cv2.circle(out, center, radius, color, -1, cv2.LINE_AA)
    return out


def encode_png(array: Any) -> bytes:
    """PNG bytes of an (H, W) bool/uint8 mask (bool -> 0/255), HxWx3 RGB or HxWx4 RGBA uint8 array."""
    from PIL import Image

    array = np.asarray(array)
    if array.dtype == bool:
        array = np.where(array, 255, 0).astype(np.uint8)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png needs a bool or uint8 array, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    valid = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if not valid or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"save_png needs an (H, W), HxWx3 or HxWx4 array, got shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def save_png(path: PathLike, array: Any) -> None:
    """Write `array` (see encode_png) as a PNG, atomically: a reader never sees a half-written file."""
    atomic_write_bytes(path, encode_png(array))
