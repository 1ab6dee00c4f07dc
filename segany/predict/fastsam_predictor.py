"""`FastSamPredictor`: SAM's predictor API over FastSAM. `set_image` runs the network once (every
mask of the image); `predict` only selects among those masks (no network).

    predictor = segany.SamPredictor(segany.load_model("fastsam-s"))   # dispatches here
    predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=[[x, y]], point_labels=[1])
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from . import select as sel
from .fastsam import FastSam, FastSamResult, FastSamSettings
from .inputs import load_image

# How points select masks (see segany.predict.select):
#   "every":  ultralytics' FastSAM: every mask holding a positive point and no negative point
#   "merged": FastSAM's repository: one mask merged from the masks the points touch (largest first)
POINT_SEMANTICS = ("every", "merged")


class FastSamPredictor:
    def __init__(self, model: Any, settings: Optional[FastSamSettings] = None, **options: Any) -> None:
        self.model = model
        self.fastsam = FastSam(model, FastSamSettings(**options) if options and settings is None else settings)
        self.reset_image()

    def reset_image(self) -> None:
        self._result: Optional[FastSamResult] = None

    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """Run the network on an HxWx3 uint8 array (RGB unless image_format='BGR'), a PIL image or a path."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        image = load_image(image)
        if image_format == "BGR":
            image = np.ascontiguousarray(image[..., ::-1])
        self.reset_image()
        self._result = self.fastsam.everything(image)

    @property
    def is_image_set(self) -> bool:
        return self._result is not None

    @property
    def original_size(self) -> Tuple[int, int]:
        return self.everything().image_hw

    def everything(self) -> FastSamResult:
        """Every mask of the current image (boxes, scores, masks), in descending score order."""
        if self._result is None:
            raise ValueError("no image is set: call set_image(image) first")
        return self._result

    def select(self, point_coords: Any = None, point_labels: Any = None, box: Any = None) -> np.ndarray:
        """Indices into `everything()` chosen by points and/or boxes (ultralytics' semantics)."""
        result = self.everything()
        if point_coords is None and box is None:
            raise ValueError("give at least one prompt: point_coords/point_labels or box")
        if point_coords is None and point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        return sel.select(result.masks, point_coords, point_labels, box)

    def predict(
        self,
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        point_semantics: str = "every",
    ) -> Tuple[np.ndarray, np.ndarray, None]:
        """Masks (C, H, W) bool, scores (C,) (detection confidence) and None (FastSAM has no low-res logits).

        multimask_output=True: every selected mask, in everything order (C may be 0).
        multimask_output=False: one mask, the union of the selection (score: the best selected one's).
        point_semantics="merged": FastSAM repository's merged point mask (one mask; boxes not allowed).
        """
        if mask_input is not None:
            raise ValueError("FastSAM takes no mask_input: prompt it with points or boxes")
        if return_logits:
            raise ValueError("FastSAM masks come from its proposals: return_logits is not available")
        if point_semantics not in POINT_SEMANTICS:
            raise ValueError(f"point_semantics must be one of {', '.join(POINT_SEMANTICS)}, got {point_semantics!r}")
        result = self.everything()
        h, w = result.image_hw
        if point_semantics == "merged":
            if box is not None:
                raise ValueError('point_semantics="merged" takes points only, not boxes')
            if point_coords is None:
                raise ValueError("give point_coords (and point_labels)")
            merged = sel.merge_points(result.masks, point_coords, point_labels)
            touched = sel.select_points(result.masks, point_coords, point_labels) if merged.any() else []
            score = float(result.scores[touched].max()) if len(touched) else 0.0
            return merged[None], np.asarray([score], dtype=np.float32), None
        index = self.select(point_coords, point_labels, box)
        if multimask_output:
            return result.masks[index], result.scores[index], None
        if len(index) == 0:
            return np.zeros((1, h, w), dtype=bool), np.zeros(1, dtype=np.float32), None
        return result.masks[index].any(0)[None], result.scores[index].max(keepdims=True), None
