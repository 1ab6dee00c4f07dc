"""Semantic-SAM's interactive predictor: one click, one mask per granularity level with its predicted IoU.

    predictor = SamPredictor(load_model("semantic-sam-t"))   # dispatches here
    predictor.set_image(image)
    masks, scores, low_res = predictor.predict(point_coords=[[x, y]])             # levels 1..6
    mask, score, _ = predictor.predict(point_coords=[[x, y]], granularity=3)      # one level

As released, the image is resized so that its short edge is 640 (Pillow bicubic), the model runs in
that frame, and a click is a tiny box at its relative position. Masks come back at the image's own size:
the model-frame logits, resized bilinearly when the image was not already that size (the release stops
at the model frame). The release's own post-processing (`SemanticSAMPredictor.process_multi_mask`) is
`predict_filtered`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..engine import semantic_sam as engine
from ..modeling.semantic_sam import LEVEL_TO_TOKEN, LEVELS, ImageFeatures, SemanticSam
from ..modeling.semantic_sam.decoder import DecoderOutput
from . import mask_ops
from .inputs import load_image


def check_level(level: Any) -> int:
    """A granularity level 1..6 (an int, or its digits as text), or a ValueError saying so."""
    if isinstance(level, str) and level.strip().isdigit():
        level = int(level.strip())
    try:
        value = int(level)
        ok = value == level and not isinstance(level, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok or value not in LEVELS:
        raise ValueError(f"granularity level must be an integer from 1 to {len(LEVELS)}, got {level!r}")
    return value


def resized_size(height: int, width: int, short_edge: int) -> Tuple[int, int]:
    """(H', W') with the short edge at `short_edge`, the long edge int(short_edge * long / short) (truncated),
    as torchvision's Resize(short_edge) computes it."""
    if width <= height:
        return int(short_edge * height / width), short_edge
    return short_edge, int(short_edge * width / height)


def resize_short_edge(image: np.ndarray, short_edge: int) -> np.ndarray:
    """HxWx3 uint8 -> the model frame (Pillow bicubic, antialiased); unchanged if already that size."""
    from PIL import Image

    h, w = image.shape[:2]
    nh, nw = resized_size(h, w, short_edge)
    if (nh, nw) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))


@dataclass
class SemanticSamImage:
    """An image's features in the model frame, and the sizes to map results back."""

    features: ImageFeatures
    original_size: Tuple[int, int]  # (H, W) of the image given
    input_size: Tuple[int, int]  # (H', W') of the model frame (short edge 640)
    values: engine.ImageValues  # the decoder's click-independent share (segany.engine.semantic_sam)

    def decode(self, model: SemanticSam, points: torch.Tensor) -> DecoderOutput:
        """model.decode(features, points), computed with the cached values."""
        return engine.decode(model, self.values, points)


def embed_image(model: SemanticSam, image: Any) -> SemanticSamImage:
    array = load_image(image)
    resized = resize_short_edge(array, model.cfg.short_edge)
    tensor = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)
    with torch.no_grad():
        features = engine.image_features(model, tensor.to(model.pixel_mean.device))
    return SemanticSamImage(features, (array.shape[0], array.shape[1]), (resized.shape[0], resized.shape[1]),
                            engine.image_values(model, features))


def upscale_logits(model: SemanticSam, lowres: torch.Tensor, embedded: SemanticSamImage) -> torch.Tensor:
    """(K, Hp/4, Wp/4) -> (K, H, W) float logits at the original image's size."""
    full = model.upscale(lowres[None], embedded.features)[0]
    if tuple(full.shape[-2:]) != embedded.original_size:
        full = F.interpolate(full[None], size=embedded.original_size, mode="bilinear", align_corners=False)[0]
    return full


@dataclass
class FilteredLevels:
    """What the release's predictor draws for a click (`process_multi_mask`)."""

    levels: List[int]  # surviving levels, highest predicted IoU first
    scores: List[float]  # their raw predicted IoU
    scores_rounded: List[float]  # round(score, 2): what the release compares and prints
    masks: np.ndarray  # (k, H, W) bool, holes and islands below the areas cleaned
    areas: List[int]  # pixels of each raw mask (logits > 0) before the clean-up
    area_order: List[int]  # indices into the survivors by ascending raw area (the release's second list)


def filter_levels(
    logits: torch.Tensor, scores: torch.Tensor, levels: Sequence[int], iou_floor: float = 0.5,
    hole_area: int = 100, island_area: int = 100, duplicate_iou: float = 0.95,
) -> FilteredLevels:
    """The release's filtering of one click's masks.

    In descending score order: skip a mask whose 2-decimal score is below `iou_floor`, or whose raw mask
    overlaps an already kept one with IoU > `duplicate_iou`; if nothing was kept when the last mask is
    reached, keep it anyway. Kept masks get holes, then islands, smaller than the areas removed.
    """
    order = torch.argsort(scores, descending=True).tolist()
    raw = (logits > 0).cpu().numpy()
    kept: List[int] = []
    for rank, i in enumerate(order):
        rounded = round(float(scores[i]), 2)
        skip = rounded < iou_floor
        for j in kept:
            inter = np.logical_and(raw[i], raw[j]).sum()
            union = np.logical_or(raw[i], raw[j]).sum()
            if union and inter / union > duplicate_iou:
                skip = True
                break
        if rank == len(order) - 1 and not kept:
            skip = False
        if not skip:
            kept.append(i)
    masks = []
    for i in kept:
        m, _ = mask_ops.remove_small_regions(raw[i], int(hole_area), "holes")
        m, _ = mask_ops.remove_small_regions(m, int(island_area), "islands")
        masks.append(m)
    areas = [int(raw[i].sum()) for i in kept]
    h, w = raw.shape[-2:]
    return FilteredLevels(
        levels=[int(levels[i]) for i in kept],
        scores=[float(scores[i]) for i in kept],
        scores_rounded=[round(float(scores[i]), 2) for i in kept],
        masks=np.stack(masks) if masks else np.zeros((0, h, w), bool),
        areas=areas,
        area_order=[int(i) for i in torch.argsort(torch.tensor(areas), descending=False).tolist()],
    )


class SemanticSamPredictor:
    """set_image, then predict: SamPredictor's interface for Semantic-SAM."""

    mask_threshold = 0.0

    def __init__(self, model: SemanticSam) -> None:
        if model.num_levels != len(LEVELS):
            raise ValueError(f"this model has {model.num_levels} granularity tokens; the levels 1..6 need 6")
        self.model = model
        self.reset_image()

    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """An HxWx3 uint8 array (RGB unless image_format='BGR'), a PIL image or a path."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format == "BGR" and isinstance(image, np.ndarray) and image.ndim == 3:
            image = image[..., ::-1]
        self.reset_image()
        self._image = embed_image(self.model, image)

    def reset_image(self) -> None:
        self._image: Optional[SemanticSamImage] = None
        self.last_levels: List[int] = []

    @property
    def is_image_set(self) -> bool:
        return self._image is not None

    @property
    def image(self) -> SemanticSamImage:
        if self._image is None:
            raise ValueError("no image is set: call set_image(image) first")
        return self._image

    @property
    def original_size(self) -> Tuple[int, int]:
        return self.image.original_size

    @property
    def input_size(self) -> Tuple[int, int]:
        return self.image.input_size

    def _click(self, point_coords: Any, point_labels: Any) -> torch.Tensor:
        """One click (x, y) in the image's pixels -> (1, 2) relative to the image."""
        if point_coords is None:
            raise ValueError("Semantic-SAM needs a click: point_coords=[[x, y]]")
        coords = np.asarray(point_coords, dtype=np.float64).reshape(-1, 2) if np.size(point_coords) == 2 else None
        if coords is None:
            raise ValueError(f"Semantic-SAM takes exactly one click (x, y), got point_coords of shape {np.shape(point_coords)}")
        if point_labels is not None and np.asarray(point_labels).reshape(-1).tolist() != [1]:
            raise ValueError("Semantic-SAM takes one foreground click (label 1); background clicks are not supported")
        if not np.all(np.isfinite(coords)):
            raise ValueError("point_coords contains NaN or infinite values")
        h, w = self.original_size
        x, y = coords[0]
        if not (0 <= x <= w and 0 <= y <= h):
            raise ValueError(f"click ({x:g}, {y:g}) is outside the image ({w}x{h} pixels)")
        return torch.tensor([[x / w, y / h]], dtype=torch.float64)

    @torch.no_grad()
    def predict_logits(self, point_coords: Any, point_labels: Any = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (6, Hp/4, Wp/4) and raw scores (6,), in level order 1..6."""
        out = self.image.decode(self.model, self._click(point_coords, point_labels))
        tokens = torch.tensor([LEVEL_TO_TOKEN[level] for level in LEVELS])
        return out.masks[0][tokens], out.ious[0, 0][tokens]

    def predict(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        granularity: Optional[int] = None,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C, H, W) at the image's size, raw predicted IoU (C,), low-res logits (C, Hp/4, Wp/4).

        multimask_output=True: the six levels in order 1..6; granularity=k: level k only;
        multimask_output=False: the level with the highest predicted IoU.
        """
        if box is not None or mask_input is not None:
            raise ValueError("Semantic-SAM takes a click only: box and mask_input are not supported")
        if granularity is not None:
            picked = [check_level(granularity) - 1]
        lowres, scores = self.predict_logits(point_coords, point_labels)
        if granularity is None:
            picked = list(range(len(LEVELS))) if multimask_output else [int(torch.argmax(scores))]
        lowres, scores = lowres[picked], scores[picked]
        self.last_levels = [LEVELS[i] for i in picked]  # the level of each returned mask
        full = upscale_logits(self.model, lowres, self.image)
        masks = full if return_logits else full > self.mask_threshold
        return masks.cpu().numpy(), scores.cpu().numpy(), lowres.cpu().numpy()

    def predict_filtered(
        self, point_coords: Any, point_labels: Any = None, iou_floor: float = 0.5, hole_area: int = 100,
        island_area: int = 100,
    ) -> FilteredLevels:
        """The release's `predict_masks`: levels surviving its IoU floor and duplicate removal, cleaned."""
        lowres, scores = self.predict_logits(point_coords, point_labels)
        full = upscale_logits(self.model, lowres, self.image)
        return filter_levels(full, scores, list(LEVELS), iou_floor, hole_area, island_area)
