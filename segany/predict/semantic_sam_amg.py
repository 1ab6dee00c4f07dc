"""Everything mode for Semantic-SAM: the grid of clicks at one granularity level or several.

    SemanticSamAutomaticMaskGenerator(model, level=[3]).generate(image)   # the released interface
    MaskGenerator(SemanticSamMaskSource(model, levels=[3]), AmgSettings(...)).generate(image)

Each click gives one mask per requested level (ordered click-major, then in the order of `levels`);
the rest (IoU and stability thresholds, box NMS, small-region clean-up, records) is the SAM generator's.
As released, all clicks of a batch go through the decoder together and attend to each other, so the
results depend on `points_per_batch` (the release's default, 200, decodes a 8x8 or 14x14 grid at once).
Records are SAM-style: masks at the image's size and `point_coords` in its pixels (the release returns
the model frame, short edge 640, and normalised points).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..modeling.semantic_sam import LEVEL_TO_TOKEN, SemanticSam
from .amg import AmgSettings, MaskGenerator
from .semantic_sam_predictor import SemanticSamImage, check_level, embed_image, upscale_logits


def check_levels(levels: Any) -> List[int]:
    if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool):
        levels = [levels]
    levels = [check_level(level) for level in levels]
    if not levels:
        raise ValueError("give at least one granularity level (1..6)")
    return levels


class SemanticSamMaskSource:
    """Semantic-SAM as the generator's mask source (see segany.predict.amg.MaskSource)."""

    mask_threshold = 0.0

    def __init__(self, model: SemanticSam, levels: Sequence[int] = (1, 2, 3, 4, 5, 6)) -> None:
        self.model = model
        self.levels = check_levels(levels)
        self.tokens = torch.tensor([LEVEL_TO_TOKEN[level] for level in self.levels])
        self._image: Optional[SemanticSamImage] = None

    def set_crop(self, image: np.ndarray) -> None:
        self._image = embed_image(self.model, image)

    def reset(self) -> None:
        self._image = None

    @torch.no_grad()
    def predict(self, points: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 2) pixels of the crop -> low-res logits (N, L, Hp/4, Wp/4), raw scores (N, L)."""
        h, w = self._image.original_size
        rel = torch.as_tensor(np.asarray(points, dtype=np.float64) / np.array([w, h], dtype=np.float64))
        out = self._image.decode(self.model, rel)
        n, t = out.ious.shape[1:]
        masks = out.masks[0].view(n, t, *out.masks.shape[-2:])
        return masks[:, self.tokens], out.ious[0][:, self.tokens]

    @torch.no_grad()
    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        return upscale_logits(self.model, logits, self._image)


def semantic_sam_settings(**overrides: Any) -> AmgSettings:
    """AmgSettings with the released Semantic-SAM generator's defaults."""
    base = dict(points_per_side=32, points_per_batch=200, pred_iou_thresh=0.88, stability_score_thresh=0.92,
                min_mask_region_area=10)
    base.update(overrides)
    return AmgSettings(**base)


class SemanticSamAutomaticMaskGenerator:
    """The released interface (`tasks.automatic_mask_generator.SemanticSamAutomaticMaskGenerator`), with its
    defaults; `generate(image)` takes the image itself (HxWx3 uint8, PIL image or path)."""

    def __init__(
        self,
        model: SemanticSam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 200,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.92,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 10,
        output_mode: str = "binary_mask",
        level: Sequence[int] = (1, 2, 3, 4, 5, 6),
    ) -> None:
        settings = AmgSettings(
            points_per_side=points_per_side, points_per_batch=points_per_batch, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh, stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh, crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio, crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids, min_mask_region_area=min_mask_region_area, output_mode=output_mode,
        )
        self.source = SemanticSamMaskSource(model, level)
        self.generator = MaskGenerator(self.source, settings)
        self.level = list(self.source.levels)

    def generate(self, image: Any) -> List[Dict[str, Any]]:
        return self.generator.generate(image)


# Settings in which the released Semantic-SAM generator's defaults differ from SAM's.
SEMANTIC_SAM_DEFAULTS = {"points_per_batch": 200, "stability_score_thresh": 0.92, "min_mask_region_area": 10}


def semantic_sam_defaults_for(model: Any, levels: Optional[Sequence[int]], settings: AmgSettings, ctx: Any = None):
    """For the CLI: a SemanticSamMaskSource when `model` is Semantic-SAM (settings the user left at
    SAM's defaults take the Semantic-SAM release's), else None; levels without Semantic-SAM are an error."""
    if not isinstance(model, SemanticSam):
        if levels is not None:
            raise ValueError("--level needs a Semantic-SAM checkpoint (e.g. -c semantic-sam-t)")
        return None
    for name, value in SEMANTIC_SAM_DEFAULTS.items():
        source = ctx.get_parameter_source(name) if ctx is not None else None
        if source is None or source.name == "DEFAULT":
            setattr(settings, name, value)
    return SemanticSamMaskSource(model, levels if levels is not None else (1, 2, 3, 4, 5, 6))


def as_mask_source(model: Any) -> Optional[SemanticSamMaskSource]:
    """A SemanticSamMaskSource at all six levels for a Semantic-SAM model, else None."""
    return SemanticSamMaskSource(model) if isinstance(model, SemanticSam) else None
