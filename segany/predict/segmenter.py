"""segany's own predictor API: embed an image once, then segment it with any number of prompts.

    seg = Segmenter(model)
    emb = seg.embed("photo.jpg")
    pred = seg.segment(emb, Prompt(points=[[320, 200]], labels=[1]))
    pred.masks, pred.scores, pred.low_res_logits

Prompts with the same structure (number of points, box or not, mask or not) are decoded together in
one batch; different structures go in separate batches, so every result is exactly what a single-prompt
call would give (padding prompts to one length would change the answer).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..engine import SamEngine
from .inputs import check_boxes, check_mask_input, check_points, load_image
from .transforms import ResizeLongestSide


@dataclass
class ImageEmbedding:
    """The image encoder's output for one image, with the sizes needed to map prompts and masks."""

    features: Dict[str, torch.Tensor]  # "image_embeddings": (1, 256, 64, 64), variants add more
    original_size: Tuple[int, int]  # (H, W) of the user's image
    input_size: Tuple[int, int]  # (h, w) after resizing the long side to the model's input size
    # What the decoder derives from these features and re-uses for every prompt (see SamEngine.decode).
    # Treat an ImageEmbedding as a value: replace it rather than editing its tensors in place.
    decoder_cache: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_embeddings(self) -> torch.Tensor:
        return self.features["image_embeddings"]


@dataclass
class Prompt:
    """One prompt, in the original image's pixels. Any combination of points, a box and a mask."""

    points: Optional[Any] = None  # (K, 2) x, y
    labels: Optional[Any] = None  # (K,) 1 foreground, 0 background
    box: Optional[Any] = None  # (4,) x0, y0, x1, y1
    mask: Optional[Any] = None  # (256, 256) or (1, 256, 256) low-res logits of an earlier prediction
    # A text prompt ("a dog"): the candidate masks (everything mode, or the ones given) that CLIP matches
    # best, top_k of them; negative phrases lower masks that look like them (see text_select). Alone only.
    text: Optional[str] = None
    negative: Optional[Sequence[str]] = None
    top_k: int = 1

    def signature(self) -> Tuple[int, bool, bool]:
        n_points = 0 if self.points is None else len(self.points)
        return n_points, self.box is not None, self.mask is not None


@dataclass
class Prediction:
    masks: np.ndarray  # (C, H, W) bool, or float logits when return_logits
    scores: np.ndarray  # (C,) predicted IoU
    low_res_logits: np.ndarray  # (C, 256, 256)
    extras: Dict[str, Any] = field(default_factory=dict)


class Segmenter:
    """Stateless predictor: embeddings are values you keep, re-use and store."""

    def __init__(self, model: torch.nn.Module, prompt_batch_size: int = 64, mode: Optional[str] = None,
                 clip: Optional[torch.nn.Module] = None) -> None:
        """`mode`: "exact" or "fast"; by default the mode the model was loaded for (load_model).
        `clip`: a CLIP model for text prompts (segany.load_model("clip_vit_b32"))."""
        self.model = model
        self.engine = SamEngine(model, mode)
        self.clip = clip
        self.text_candidate_settings = None  # AmgSettings of the everything mode that text prompts choose from
        self.transform = ResizeLongestSide(model.image_size)
        self.prompt_batch_size = prompt_batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def low_res_size(self) -> Tuple[int, int]:
        h, w = self.model.prompt_encoder.mask_input_size
        return h, w

    # ------------------------------------------------------------ embedding

    def _prepare(self, image: Any) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        array = load_image(image)
        resized = self.transform.apply_image(array)
        tensor = torch.from_numpy(np.array(resized)).to(self.device).permute(2, 0, 1).contiguous()[None]
        return tensor, (array.shape[0], array.shape[1]), (resized.shape[0], resized.shape[1])

    @torch.no_grad()
    def embed_torch(self, transformed: torch.Tensor, original_size: Tuple[int, int]) -> ImageEmbedding:
        """`transformed`: (1, 3, h, w) already resized so the long side is the model's input size."""
        if transformed.ndim != 4 or transformed.shape[:2] != (1, 3):
            raise ValueError(f"transformed image must be (1, 3, h, w), got {tuple(transformed.shape)}")
        if max(transformed.shape[2:]) != self.model.image_size:
            raise ValueError(f"the long side of the transformed image must be {self.model.image_size}")
        features = self.engine.encode(self.engine.preprocess(transformed))
        return ImageEmbedding(features, tuple(original_size), tuple(transformed.shape[-2:]))

    def embed(self, image: Any) -> ImageEmbedding:
        tensor, original_size, _ = self._prepare(image)
        return self.embed_torch(tensor, original_size)

    @torch.no_grad()
    def embed_many(self, images: Iterable[Any], batch_size: int = 4) -> List[ImageEmbedding]:
        """Embed several images, `batch_size` at a time through the encoder."""
        prepared = [self._prepare(image) for image in images]
        out: List[ImageEmbedding] = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start : start + batch_size]
            batch = torch.cat([self.engine.preprocess(t) for t, _, _ in chunk], dim=0)
            features = self.engine.encode(batch)
            for i, (_, original_size, input_size) in enumerate(chunk):
                one = {name: value[i : i + 1] for name, value in features.items()}
                out.append(ImageEmbedding(one, original_size, input_size))
        return out

    def embedding_from_tensor(self, embedding: Any, original_size: Tuple[int, int]) -> ImageEmbedding:
        """Wrap a stored (1, C, 64, 64) embedding (tensor or array) for an image of `original_size`."""
        tensor = torch.as_tensor(np.asarray(embedding) if not torch.is_tensor(embedding) else embedding)
        if tensor.ndim == 3:
            tensor = tensor[None]
        side = self.model.prompt_encoder.image_embedding_size
        expected = (1, self.model.prompt_encoder.embed_dim, side[0], side[1])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"image embedding must have shape {expected}, got {tuple(tensor.shape)}")
        h, w = int(original_size[0]), int(original_size[1])
        if h <= 0 or w <= 0:
            raise ValueError(f"original_size must be positive (H, W), got {original_size}")
        dtype = self.model.prompt_encoder.point_embeddings[0].weight.dtype
        input_size = self.transform_size(original_size)
        features = {"image_embeddings": tensor.to(self.device, dtype)}
        return ImageEmbedding(features, (h, w), input_size)

    def transform_size(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        from .transforms import preprocess_shape

        return preprocess_shape(int(original_size[0]), int(original_size[1]), self.model.image_size)

    # ------------------------------------------------------------ decoding

    @torch.no_grad()
    def decode_torch(
        self,
        embedding: ImageEmbedding,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        **decode_options: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts already in the model's input frame -> low-res logits (B, C, 256, 256), IoU (B, C)."""
        points = (point_coords, point_labels) if point_coords is not None else None
        return self.engine.decode(
            embedding.features, points, boxes, mask_input, multimask_output, cache=embedding.decoder_cache, **decode_options
        )

    def upscale(self, low_res: torch.Tensor, embedding: ImageEmbedding, threshold: Optional[float] = None) -> torch.Tensor:
        """Low-res logits (..., 256, 256) -> logits at the original image size, or with `threshold` the
        masks logits > threshold (see SamEngine.upscale)."""
        return self.engine.upscale(low_res, embedding.input_size, embedding.original_size, threshold)

    def _validate(self, prompt: Prompt, embedding: ImageEmbedding) -> Prompt:
        coords, labels = check_points(prompt.points, prompt.labels, embedding.original_size)
        if coords is not None and coords.ndim != 2:
            raise ValueError(f"a Prompt's points must have shape (K, 2), got {coords.shape}")
        box = check_boxes(prompt.box, embedding.original_size)
        if box is not None and box.ndim != 1:
            raise ValueError(f"a Prompt's box must have shape (4,), got {box.shape}")
        mask = check_mask_input(prompt.mask, self.low_res_size)
        if mask is not None and mask.shape[0] != 1:
            raise ValueError("a Prompt's mask must be one (256, 256) logit map")
        return Prompt(coords, labels, box, mask)

    def segment(
        self,
        embedding: ImageEmbedding,
        prompts: Union[Prompt, Sequence[Prompt]],
        multimask_output: bool = True,
        return_logits: bool = False,
        image: Any = None,
        candidates: Any = None,
        **decode_options: Any,
    ) -> Union[Prediction, List[Prediction]]:
        """Masks at the original image size for one prompt or a list of prompts.

        Text prompts need the image's pixels (`image`) and a CLIP model (Segmenter(..., clip=...)); their
        candidates are everything-mode masks of the image unless `candidates` gives them."""
        single = isinstance(prompts, Prompt)
        prompt_list = [prompts] if single else list(prompts)
        if not isinstance(embedding, ImageEmbedding):
            raise ValueError("segment() needs an ImageEmbedding from embed(); call embed(image) first")
        if any(p.text is not None for p in prompt_list):
            from .text_select import segment_text_prompts

            return segment_text_prompts(self, embedding, prompt_list, single, image, candidates,
                                        lambda rest: self.segment(embedding, rest, multimask_output, return_logits, **decode_options))
        checked = [self._validate(p, embedding) for p in prompt_list]
        for p in checked:
            if p.signature() == (0, False, False):
                raise ValueError("a prompt needs at least one point, a box or a mask")
        results: List[Optional[Prediction]] = [None] * len(checked)
        groups: Dict[Tuple[int, bool, bool], List[int]] = defaultdict(list)
        for i, p in enumerate(checked):
            groups[p.signature()].append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.prompt_batch_size):
                chunk = indices[start : start + self.prompt_batch_size]
                preds = self._segment_group(
                    embedding, [checked[i] for i in chunk], multimask_output, return_logits, decode_options
                )
                for i, pred in zip(chunk, preds):
                    results[i] = pred
        return results[0] if single else results  # type: ignore[return-value]

    @torch.no_grad()
    def _segment_group(
        self,
        embedding: ImageEmbedding,
        prompts: List[Prompt],
        multimask_output: bool,
        return_logits: bool,
        decode_options: Dict[str, Any],
    ) -> List[Prediction]:
        """Decode prompts of one structure as one batch."""
        size = embedding.original_size
        device = self.device
        coords = labels = boxes = masks = None
        if prompts[0].points is not None:
            coords_np = np.stack([self.transform.apply_coords(p.points, size) for p in prompts])
            coords = torch.as_tensor(coords_np, dtype=torch.float, device=device)
            labels = torch.as_tensor(np.stack([p.labels for p in prompts]), dtype=torch.int, device=device)
        if prompts[0].box is not None:
            boxes_np = np.concatenate([self.transform.apply_boxes(p.box, size) for p in prompts])
            boxes = torch.as_tensor(boxes_np, dtype=torch.float, device=device)
        if prompts[0].mask is not None:
            masks = torch.as_tensor(np.concatenate([p.mask for p in prompts]), dtype=torch.float, device=device)
        low_res, iou = self.decode_torch(embedding, coords, labels, boxes, masks, multimask_output, **decode_options)
        full = self.upscale(low_res, embedding, None if return_logits else self.model.mask_threshold)
        full_np = full.cpu().numpy()
        iou_np = iou.float().cpu().numpy()
        low_np = low_res.float().cpu().numpy()
        return [Prediction(full_np[i], iou_np[i], low_np[i]) for i in range(len(prompts))]

    def segment_images(
        self,
        images: Sequence[Any],
        prompts_per_image: Sequence[Union[Prompt, Sequence[Prompt]]],
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> List[Union[Prediction, List[Prediction]]]:
        """Several images in one call, each with its own prompts (any number, any structure)."""
        if len(images) != len(prompts_per_image):
            raise ValueError(f"{len(images)} images but prompts for {len(prompts_per_image)}")
        embeddings = self.embed_many(images)
        return [
            self.segment(emb, prompts, multimask_output, return_logits)
            for emb, prompts in zip(embeddings, prompts_per_image)
        ]
