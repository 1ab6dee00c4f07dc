"""Validation of user input: images and prompts. Every problem is a ValueError with a plain message."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np


HIGH_DEPTH_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
TRANSPARENT = ("RGBA", "RGBa", "LA", "La", "PA")
CONVERTIBLE = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def _gray_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit and float grayscale -> uint8, scaled by the range the values are in.

    Integers within 0..65535 are 16-bit samples (x / 257, so a 16-bit copy of an 8-bit image gives the
    8-bit image back); floats within 0..1 are fractions (x * 255); anything else is stretched from its
    own minimum to maximum, as image viewers show such data. NaN becomes 0.
    """
    x = values.astype(np.float64)
    finite = np.isfinite(x)
    x = np.where(finite, x, 0.0)
    lo, hi = (float(x[finite].min()), float(x[finite].max())) if finite.any() else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = x * 255.0
    elif mode != "F" and lo >= 0 and hi <= 65535:
        scaled = x / 257.0
    elif hi > lo:
        scaled = (x - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(x)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pil_to_rgb(image: Any) -> np.ndarray:
    """An HxWx3 uint8 array of a PIL image of any mode, as an image viewer shows it.

    High-depth grayscale is scaled to 8 bits (see _gray_to_8bit; PIL's own convert would clip 16-bit
    values to white), transparent pixels are shown over white, palette / CMYK / YCbCr / LAB / HSV / 1-bit
    are converted by PIL. A mode with no sensible picture is a ValueError that names it.
    """
    mode = image.mode
    if mode in HIGH_DEPTH_GRAY:
        gray = _gray_to_8bit(np.asarray(image), mode)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    transparent = mode in TRANSPARENT or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    try:
        if transparent:
            rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
            alpha = rgba[..., 3:] / 255.0
            return np.clip(np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)
        if mode in CONVERTIBLE:
            return np.asarray(image.convert("RGB"))
    except ValueError:
        pass
    raise ValueError(f"images in PIL mode {mode} are not supported: save it as 8-bit RGB or grayscale")


def load_image(image: Any) -> np.ndarray:
    """An HxWx3 uint8 RGB array from an array, a PIL image (any mode: see pil_to_rgb) or a path."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = pil_to_rgb(ImageOps.exif_transpose(opened))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from None
    if isinstance(image, Image.Image):
        image = pil_to_rgb(image)
    if hasattr(image, "detach") and hasattr(image, "numpy"):  # a torch tensor
        raise ValueError("pass the image as an HxWx3 uint8 numpy array, a PIL image or a path, not a tensor")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be an HxWx3 uint8 array, a PIL image or a path, not {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape HxWx3 (RGB), got {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0-255), got dtype {image.dtype}")
    return np.ascontiguousarray(image)


def _finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_points(
    coords: Any, labels: Any, image_size: Tuple[int, int]
) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """Points (..., K, 2) in pixels (x, y) and labels (..., K) of 0 (background) / 1 (foreground)."""
    if coords is None and labels is None:
        return None, None
    if coords is None or labels is None:
        raise ValueError("point_coords and point_labels must be given together")
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels)
    if coords.ndim < 2 or coords.shape[-1] != 2:
        raise ValueError(f"point_coords must have shape (K, 2) or (N, K, 2), got {coords.shape}")
    if labels.shape != coords.shape[:-1]:
        raise ValueError(f"point_labels shape {labels.shape} does not match point_coords shape {coords.shape}")
    if coords.shape[-2] == 0:
        raise ValueError("point_coords is empty: give at least one point or leave it out")
    _finite("point_coords", coords)
    if not ((labels == 0) | (labels == 1)).all():  # (np.isin costs tens of microseconds per click)
        raise ValueError(f"point_labels must be 0 (background) or 1 (foreground), got {np.unique(labels).tolist()}")
    h, w = image_size
    outside = (coords[..., 0] < 0) | (coords[..., 0] > w) | (coords[..., 1] < 0) | (coords[..., 1] > h)
    if outside.any():
        x, y = coords[outside][0]
        raise ValueError(f"point ({x:g}, {y:g}) is outside the {w}x{h} image")
    return coords, labels.astype(np.int64)


def check_boxes(box: Any, image_size: Tuple[int, int]) -> Optional[np.ndarray]:
    """Boxes (4,) or (N, 4) as x0, y0, x1, y1 in pixels."""
    if box is None:
        return None
    box = np.asarray(box, dtype=np.float64)
    if box.shape[-1:] != (4,) or box.ndim > 2:
        raise ValueError(f"box must have shape (4,) or (N, 4) as x0, y0, x1, y1, got {box.shape}")
    _finite("box", box)
    flat = box.reshape(-1, 4)
    if len(flat) == 0:
        raise ValueError("box is empty: give at least one box or leave it out")
    bad = (flat[:, 2] < flat[:, 0]) | (flat[:, 3] < flat[:, 1])
    if bad.any():
        raise ValueError(f"box {flat[bad][0].tolist()} has x1 < x0 or y1 < y0; boxes are x0, y0, x1, y1")
    h, w = image_size
    outside = (flat[:, 0] < 0) | (flat[:, 1] < 0) | (flat[:, 2] > w) | (flat[:, 3] > h)
    if outside.any():
        raise ValueError(f"box {flat[outside][0].tolist()} is outside the {w}x{h} image")
    return box


def check_mask_input(mask_input: Any, low_res_size: Tuple[int, int], batch: Optional[int] = None) -> Optional[np.ndarray]:
    """Low-res mask logits: (256, 256), (1, 256, 256) or, batched, (N, 1, 256, 256)."""
    if mask_input is None:
        return None
    mask = np.asarray(mask_input, dtype=np.float32)
    h, w = low_res_size
    if mask.shape in ((h, w), (1, h, w)):
        mask = mask.reshape(1, 1, h, w)
    elif mask.ndim == 4 and mask.shape[1:] == (1, h, w):
        pass
    else:
        raise ValueError(
            f"mask_input must be low-res logits of shape (1, {h}, {w}) (e.g. a previous low_res_logits[i:i+1]), "
            f"got {mask.shape}"
        )
    if batch is not None and mask.shape[0] not in (1, batch):
        raise ValueError(f"mask_input has {mask.shape[0]} masks for {batch} prompts")
    _finite("mask_input", mask)
    return mask
