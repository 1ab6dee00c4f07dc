"""`SamPredictor`: the stateful predictor users of the released code know (set_image, then predict),
built on `Segmenter`. Unlike the release, batched prompts work through `predict` too."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from .inputs import check_boxes, check_mask_input, check_points
from .segmenter import ImageEmbedding, Prompt, Segmenter


class SamPredictor:
    def __new__(cls, sam_model: Any = None, *args: Any, **kwargs: Any) -> Any:
        # FastSAM and Semantic-SAM models get their own predictors (same set_image / predict API).
        from ..modeling.semantic_sam import SemanticSam
        from ..modeling.yolov8_seg import YoloV8Seg

        if cls is SamPredictor and isinstance(sam_model, YoloV8Seg):
            from .fastsam_predictor import FastSamPredictor

            return FastSamPredictor(sam_model, *args, **kwargs)
        if cls is SamPredictor and isinstance(sam_model, SemanticSam):  # six granularities per click
            from .semantic_sam_predictor import SemanticSamPredictor

            return SemanticSamPredictor(sam_model)
        return super().__new__(cls)

    def __init__(self, sam_model: torch.nn.Module, clip: Optional[torch.nn.Module] = None) -> None:
        self.model = sam_model
        self.segmenter = Segmenter(sam_model, clip=clip)
        self.transform = self.segmenter.transform
        self.reset_image()

    # ------------------------------------------------------------ image state

    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """Embed an HxWx3 uint8 array (RGB unless image_format='BGR'), a PIL image or a path."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if image_format != self.model.image_format and isinstance(image, np.ndarray) and image.ndim == 3:
            image = image[..., ::-1]
        self.reset_image()
        self._embedding = self.segmenter.embed(image)
        self._image = image  # the pixels, for text prompts (predict_text)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """(1, 3, h, w) image already resized with `self.transform`, and the original (H, W)."""
        self.reset_image()
        self._embedding = self.segmenter.embed_torch(transformed_image, tuple(original_image_size[:2]))

    def set_image_embedding(self, embedding: Any, original_size: Optional[Tuple[int, int]] = None) -> None:
        """Re-use a stored embedding: an ImageEmbedding, or a (1, 256, 64, 64) tensor/array with the
        original image's (H, W). No encoder pass."""
        self.reset_image()
        if isinstance(embedding, ImageEmbedding):
            self._embedding = embedding
            return
        if original_size is None:
            raise ValueError("set_image_embedding needs original_size=(H, W) of the embedded image")
        self._embedding = self.segmenter.embedding_from_tensor(embedding, original_size)

    def reset_image(self) -> None:
        self._embedding: Optional[ImageEmbedding] = None
        self._image: Any = None

    def predict_text(
        self, text: str, top_k: int = 1, negative: Optional[List[str]] = None, candidates: Any = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """The top_k masks (K, H, W) for a phrase and their text scores (K,), best first, chosen among
        everything mode's masks (or `candidates`) with the CLIP model given as SamPredictor(model, clip=...)."""
        if self._image is None:
            raise ValueError("text prompts need the image's pixels: call set_image(image) first")
        pred = self.segmenter.segment(
            self.embedding, Prompt(text=text, negative=negative, top_k=top_k), image=self._image, candidates=candidates
        )
        return pred.masks, pred.scores

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def embedding(self) -> ImageEmbedding:
        if self._embedding is None:
            raise ValueError("no image is set: call set_image(image) or set_image_embedding(...) first")
        return self._embedding

    @property
    def features(self) -> torch.Tensor:
        return self.embedding.image_embeddings

    @property
    def original_size(self) -> Tuple[int, int]:
        return self.embedding.original_size

    @property
    def input_size(self) -> Tuple[int, int]:
        return self.embedding.input_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def get_image_embedding(self) -> torch.Tensor:
        """The (1, 256, 64, 64) embedding of the current image."""
        return self.embedding.image_embeddings

    # ------------------------------------------------------------ prediction

    def predict(
        self,
        point_coords: Optional[Any] = None,
        point_labels: Optional[Any] = None,
        box: Optional[Any] = None,
        mask_input: Optional[Any] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        **decode_options: Any,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks (C, H, W), IoU predictions (C,) and low-res logits (C, 256, 256) for one prompt.

        Batched: point_coords (N, K, 2) with point_labels (N, K), and/or box (N, 4), and/or mask_input
        (N, 1, 256, 256) give N prompts and outputs with a leading N. A single point set or box is shared
        by all N. point_coords may also be a list of N (K_i, 2) arrays of different lengths (with a list of
        label arrays), each decoded exactly as on its own.
        """
        embedding = self.embedding
        prompts, batched = self._to_prompts(point_coords, point_labels, box, mask_input, embedding.original_size)
        preds = self.segmenter.segment(embedding, prompts, multimask_output, return_logits, **decode_options)
        if not batched:  # (no stacked copy of one prompt's full-size masks)
            return preds[0].masks, preds[0].scores, preds[0].low_res_logits
        masks = np.stack([p.masks for p in preds])
        scores = np.stack([p.scores for p in preds])
        low_res = np.stack([p.low_res_logits for p in preds])
        return masks, scores, low_res

    def _to_prompts(
        self, coords: Any, labels: Any, box: Any, mask_input: Any, image_size: Tuple[int, int]
    ) -> Tuple[List[Prompt], bool]:
        ragged = isinstance(coords, (list, tuple)) and len(coords) > 0 and not np.isscalar(coords[0]) and (
            len({np.shape(c) for c in coords}) > 1
        )
        if ragged:
            if labels is None or len(labels) != len(coords):
                raise ValueError("with a list of point arrays, give a list of label arrays of the same length")
            point_sets = []
            for c, l in zip(coords, labels):
                c, l = check_points(c, l, image_size)
                if c.ndim != 2:
                    raise ValueError(f"each point array in the list must be (K, 2), got {c.shape}")
                point_sets.append((c, l))
        else:
            c, l = check_points(coords, labels, image_size)
            point_sets = None if c is None else ([(c, l)] if c.ndim == 2 else list(zip(c, l)))
            if c is not None and c.ndim > 3:
                raise ValueError(f"point_coords must be (K, 2) or (N, K, 2), got {c.shape}")
        boxes = check_boxes(box, image_size)
        box_list = None if boxes is None else ([boxes] if boxes.ndim == 1 else list(boxes))
        masks = check_mask_input(mask_input, self.segmenter.low_res_size)
        mask_list = None if masks is None else [m for m in masks]
        counts = {len(x) for x in (point_sets, box_list, mask_list) if x is not None}
        if not counts:
            raise ValueError("give at least one prompt: point_coords/point_labels, box or mask_input")
        n = max(counts)
        if counts - {1, n}:
            raise ValueError(f"prompt batch sizes do not agree: {sorted(counts)} (each must be 1 or N)")
        batched = ragged or (point_sets is not None and np.ndim(coords) == 3) or (
            boxes is not None and boxes.ndim == 2
        ) or (masks is not None and np.ndim(mask_input) == 4 and masks.shape[0] > 1) or n > 1

        def pick(items: Optional[list], i: int) -> Any:
            if items is None:
                return None
            return items[i] if len(items) > 1 else items[0]

        prompts = []
        for i in range(n):
            pts = pick(point_sets, i)
            prompts.append(
                Prompt(
                    points=None if pts is None else pts[0],
                    labels=None if pts is None else pts[1],
                    box=pick(box_list, i),
                    mask=pick(mask_list, i),
                )
            )
        return prompts, batched

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        **decode_options: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The released batched path: prompts already in the model's input frame (use self.transform).

        point_coords (B, K, 2), point_labels (B, K), boxes (B, 4), mask_input (B, 1, 256, 256).
        Returns masks (B, C, H, W), IoU predictions (B, C), low-res logits (B, C, 256, 256).
        """
        embedding = self.embedding
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None and (point_coords.ndim != 3 or point_coords.shape[-1] != 2):
            raise ValueError(f"point_coords must be (B, K, 2) in predict_torch, got {tuple(point_coords.shape)}")
        if boxes is not None and boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be (B, 4) in predict_torch, got {tuple(boxes.shape)}")
        if point_coords is None and boxes is None and mask_input is None:
            raise ValueError("give at least one prompt: points, boxes or mask_input")
        if boxes is not None:
            boxes = boxes.reshape(-1, 4)
        low_res, iou = self.segmenter.decode_torch(
            embedding, point_coords, point_labels, boxes, mask_input, multimask_output, **decode_options
        )
        masks = self.segmenter.upscale(low_res, embedding, None if return_logits else self.model.mask_threshold)
        return masks, iou, low_res
