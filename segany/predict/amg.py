"""Everything mode: automatic mask generation from a grid of point prompts (the paper's fully automatic
stage), with the released generator's options, defaults and results.

    gen = MaskGenerator(model, AmgSettings(points_per_side=32))
    records = gen.generate(image)           # list of dicts, as SamAutomaticMaskGenerator returns

    # the released interface
    SamAutomaticMaskGenerator(model, pred_iou_thresh=0.86).generate(image)

Per crop (the whole image, then overlapping crops when crop_n_layers > 0), points of the grid are
decoded in batches; every point gives 3 masks. Filtering happens in the order that touches the least
data: the predicted-IoU threshold needs no mask at all, so only its survivors are upscaled from the
decoder's low resolution to the crop's resolution, in small chunks; the stability score and the
binarisation run on those chunks; boxes, crop-edge filtering and RLE are vectorised over the batch.
Duplicates are removed by box NMS within each crop, then across crops (preferring smaller crops), then
optionally after small-region clean-up. The mask source (the network, or a stand-in) is pluggable.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import numpy as np
import torch

from ..io import rle as rle_io
from . import mask_ops
from .inputs import load_image

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass
class AmgSettings:
    """The released generator's settings, with its defaults (chosen for SAM ViT-H)."""

    points_per_side: Optional[int] = 32  # None when point_grids is given
    points_per_batch: int = 64  # points decoded together; affects speed and memory only
    pred_iou_thresh: float = 0.88  # keep masks whose predicted IoU is > this (0 disables)
    stability_score_thresh: float = 0.95  # keep masks whose stability score is >= this (0 disables)
    stability_score_offset: float = 1.0  # logit offset of the stability score's two thresholds
    box_nms_thresh: float = 0.7  # box IoU above which a lower-scored mask of a crop is a duplicate
    crop_n_layers: int = 0  # extra layers of crops; layer i has (2**i)**2 crops
    crop_nms_thresh: float = 0.7  # box IoU for duplicates across crops
    crop_overlap_ratio: float = 512 / 1500  # overlap of layer-1 crops, as a fraction of the short side
    crop_n_points_downscale_factor: int = 1  # layer i uses points_per_side / factor**i points per side
    point_grids: Optional[List[np.ndarray]] = None  # explicit (N, 2) grids in [0, 1], one per layer
    min_mask_region_area: int = 0  # > 0: fill holes / drop islands smaller than this many pixels
    output_mode: str = "binary_mask"  # binary_mask | uncompressed_rle | coco_rle

    def validate(self) -> "AmgSettings":
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if self.points_per_side is not None and int(self.points_per_side) < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if int(self.points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {self.points_per_batch}")
        if int(self.crop_n_layers) < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")
        if int(self.crop_n_points_downscale_factor) < 1:
            raise ValueError("crop_n_points_downscale_factor must be >= 1")
        if not 0 <= float(self.crop_overlap_ratio) < 1:
            raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio}")
        if float(self.stability_score_offset) < 0:
            raise ValueError("stability_score_offset must be >= 0")
        if int(self.min_mask_region_area) < 0:
            raise ValueError("min_mask_region_area must be >= 0")
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {self.output_mode!r}; choose one of {', '.join(OUTPUT_MODES)}")
        if self.point_grids is not None:
            grids = [np.asarray(g, dtype=np.float64) for g in self.point_grids]
            if len(grids) < self.crop_n_layers + 1:
                raise ValueError(f"point_grids needs one grid per layer ({self.crop_n_layers + 1}), got {len(grids)}")
            for g in grids:
                if g.ndim != 2 or g.shape[1] != 2:
                    raise ValueError(f"each point grid must be (N, 2) x, y in [0, 1], got shape {g.shape}")
            self.point_grids = grids
        return self

    def layer_grids(self) -> List[np.ndarray]:
        if self.point_grids is not None:
            return list(self.point_grids)
        return mask_ops.build_all_layer_point_grids(
            int(self.points_per_side), int(self.crop_n_layers), int(self.crop_n_points_downscale_factor)
        )

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if d["point_grids"] is not None:
            d["point_grids"] = [np.asarray(g).tolist() for g in d["point_grids"]]
        return d


# ----------------------------------------------------------------------------- mask sources


@runtime_checkable
class MaskSource(Protocol):
    """What the generator needs from a mask predictor.

    set_crop(image): the (h, w, 3) uint8 crop that the following points refer to.
    predict(points): (N, 2) float64 x, y in the crop's pixels -> (logits (N, 3, h', w'), iou (N, 3)).
        The logits may be at a lower resolution than the crop (h', w' != h, w); then
    upscale(logits): (M, h', w') -> (M, h, w) float logits at the crop's resolution, the ones that
        the stability score and the binarisation see. A source that already predicts at the crop's
        resolution returns its input.
    mask_threshold: the logit above which a pixel is in the mask.
    """

    mask_threshold: float

    def set_crop(self, image: np.ndarray) -> None: ...

    def predict(self, points: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]: ...

    def upscale(self, logits: torch.Tensor) -> torch.Tensor: ...


class SamMaskSource:
    """The network as a mask source: a segany Segmenter over a SAM-family model.

    predict() returns the decoder's low-resolution (256 x 256) logits; upscale() maps them to the crop
    exactly as the released post-processing does (Sam.postprocess_masks).

    Where the engine can (the plain SAM mask decoder, exact or fast mode) it also offers
    predict_above(), the path the generator prefers: the output upscaling and hypernetwork products
    run only for the (point, mask) pairs that pass the predicted-IoU threshold
    (SamEngine.decode_above); the values are those of a full decode.
    """

    def __init__(self, model: torch.nn.Module, decode_options: Optional[Dict[str, Any]] = None) -> None:
        from .segmenter import Segmenter

        self.segmenter = Segmenter(model)
        self.mask_threshold = float(getattr(model, "mask_threshold", 0.0))
        self.decode_options = dict(decode_options or {})
        self.embedding = None
        if not self._can_split():
            self.predict_above = None  # type: ignore[assignment]  # generator falls back to predict()

    @property
    def model(self) -> torch.nn.Module:
        return self.segmenter.model

    def _can_split(self) -> bool:
        return self.segmenter.engine.can_decode_above and not self.decode_options

    def set_crop(self, image: np.ndarray) -> None:
        self.embedding = self.segmenter.embed(np.ascontiguousarray(image))

    def reset(self) -> None:
        self.embedding = None

    def _require_embedding(self):
        if self.embedding is None:
            raise RuntimeError("set_crop() must be called before predict()")
        return self.embedding

    def _prompts(self, points: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        emb = self._require_embedding()
        # float64 coordinates, as the released generator feeds them; the prompt encoder casts after scaling
        coords = self.segmenter.transform.apply_coords(np.asarray(points, dtype=np.float64), emb.original_size)
        coords_t = torch.as_tensor(coords, device=self.segmenter.device)[:, None, :]  # N, 1, 2
        labels = torch.ones(coords_t.shape[0], 1, dtype=torch.int, device=coords_t.device)
        return coords_t, labels

    @torch.no_grad()
    def predict(self, points: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        coords, labels = self._prompts(points)
        emb = self._require_embedding()
        return self.segmenter.decode_torch(emb, coords, labels, None, None, True, **self.decode_options)

    @torch.no_grad()
    def predict_above(
        self, points: np.ndarray, iou_threshold: float
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode one-point prompts, computing masks only for outputs that pass the predicted-IoU filter:
        iou (N, 3), flat_index (K,) = point * 3 + output, ascending, and their low-res logits (K, 256,
        256) (see SamEngine.decode_above)."""
        coords, labels = self._prompts(points)
        emb = self._require_embedding()
        return self.segmenter.engine.decode_above(
            coords, labels, iou_threshold, features=emb.features, input_size=emb.input_size, cache=emb.decoder_cache
        )

    @torch.no_grad()
    def upscale(self, logits: torch.Tensor) -> torch.Tensor:
        emb = self._require_embedding()
        return self.segmenter.upscale(logits[:, None], emb)[:, 0]


# ----------------------------------------------------------------------------- results


@dataclass
class MaskRecords:
    """Masks of one image as arrays (N rows), before formatting into released-style dicts."""

    size: Tuple[int, int]  # (H, W) of the image
    counts: List[np.ndarray] = field(default_factory=list)  # uncompressed RLE run lengths per mask
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))  # x0 y0 x1 y1 inclusive
    iou_preds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float64))  # image pixels
    stability: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    crop_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))

    def __len__(self) -> int:
        return len(self.counts)

    _ARRAYS = ("boxes", "iou_preds", "points", "stability", "crop_boxes")

    def select(self, index: np.ndarray) -> "MaskRecords":
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        out = MaskRecords(self.size, [self.counts[i] for i in index])
        for name in self._ARRAYS:
            setattr(out, name, getattr(self, name)[index])
        return out

    @classmethod
    def concat(cls, size: Tuple[int, int], parts: Sequence["MaskRecords"]) -> "MaskRecords":
        out = cls(size)
        if not parts:
            return out
        out.counts = [c for p in parts for c in p.counts]
        for name in cls._ARRAYS:
            setattr(out, name, np.concatenate([getattr(p, name) for p in parts], axis=0))
        return out

    def areas(self) -> np.ndarray:
        return np.array([int(c[1::2].sum()) for c in self.counts], dtype=np.int64)

    def masks(self) -> np.ndarray:
        """(N, H, W) bool."""
        h, w = self.size
        if len(self) == 0:
            return np.zeros((0, h, w), dtype=bool)
        return np.stack([rle_io.decode({"size": [h, w], "counts": c}) for c in self.counts])

    def to_annotations(self, output_mode: str = "binary_mask") -> List[Dict[str, Any]]:
        """Released-style records: segmentation, area, bbox (XYWH), predicted_iou, point_coords,
        stability_score, crop_box (XYWH)."""
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {output_mode!r}; choose one of {', '.join(OUTPUT_MODES)}")
        h, w = self.size
        bboxes = mask_ops.box_xyxy_to_xywh(self.boxes.astype(np.float64)).tolist()
        crops = mask_ops.box_xyxy_to_xywh(self.crop_boxes.astype(np.float64)).tolist()
        areas = self.areas().tolist()
        out = []
        for i, counts in enumerate(self.counts):
            rle = {"size": [h, w], "counts": counts.tolist()}
            if output_mode == "binary_mask":
                segmentation: Any = rle_io.decode(rle)
            elif output_mode == "coco_rle":
                segmentation = rle_io.compress(rle)
            else:
                segmentation = rle
            out.append(
                {
                    "segmentation": segmentation,
                    "area": areas[i],
                    "bbox": bboxes[i],
                    "predicted_iou": float(self.iou_preds[i]),
                    "point_coords": [self.points[i].tolist()],
                    "stability_score": float(self.stability[i]),
                    "crop_box": crops[i],
                }
            )
        return out


# ----------------------------------------------------------------------------- the generator


class MaskGenerator:
    """Segment everything in an image with `settings`, using `source` for the masks.

    `source` is a MaskSource, or a SAM-family model (wrapped in SamMaskSource).
    `upscale_chunk`: how many masks are upscaled to full resolution at a time (memory vs. overhead).
    """

    def __init__(
        self,
        source: Any,
        settings: Optional[AmgSettings] = None,
        upscale_chunk: int = 16,
    ) -> None:
        if isinstance(source, torch.nn.Module):
            from .semantic_sam_amg import as_mask_source  # Semantic-SAM: its own source, all six levels

            source = as_mask_source(source) or SamMaskSource(source)
        for name in ("set_crop", "predict", "upscale"):
            if not callable(getattr(source, name, None)):
                raise ValueError(f"mask source {type(source).__name__} has no {name}() method")
        self.source = source
        self.settings = (settings or AmgSettings()).validate()
        self.point_grids = self.settings.layer_grids()
        self.upscale_chunk = max(1, int(upscale_chunk))

    @property
    def mask_threshold(self) -> float:
        return float(getattr(self.source, "mask_threshold", 0.0))

    @torch.no_grad()
    def generate(self, image: Any) -> List[Dict[str, Any]]:
        """Released-style mask records for an HxWx3 uint8 image (array, PIL image or path)."""
        return self.generate_records(image).to_annotations(self.settings.output_mode)

    @torch.no_grad()
    def generate_records(self, image: Any) -> MaskRecords:
        """The masks as arrays (see MaskRecords), in the released order."""
        array = load_image(image)
        s = self.settings
        size = (array.shape[0], array.shape[1])
        crop_boxes, layers = mask_ops.generate_crop_boxes(size, s.crop_n_layers, s.crop_overlap_ratio)
        parts = [self._process_crop(array, box, layer) for box, layer in zip(crop_boxes, layers)]
        data = MaskRecords.concat(size, parts)
        if len(crop_boxes) > 1 and len(data):
            # Across crops prefer the smaller crop (score 1 / crop area, float32 as released).
            scores = np.float32(1.0) / mask_ops.box_area(data.crop_boxes).astype(np.float32)
            data = data.select(mask_ops.box_nms(data.boxes, scores, s.crop_nms_thresh))
        if s.min_mask_region_area > 0 and len(data):
            data = self._remove_small_regions(data, s.min_mask_region_area, max(s.box_nms_thresh, s.crop_nms_thresh))
        return data

    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer: int) -> MaskRecords:
        x0, y0, x1, y1 = crop_box
        size = (image.shape[0], image.shape[1])
        crop = image[y0:y1, x0:x1, :]
        crop_h, crop_w = crop.shape[:2]
        self.source.set_crop(crop)
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)
        batch = int(self.settings.points_per_batch)
        parts = [
            self._process_batch(points[i : i + batch], crop_box, size) for i in range(0, len(points), batch)
        ]
        if hasattr(self.source, "reset"):
            self.source.reset()
        data = MaskRecords.concat(size, parts)
        if len(data) == 0:
            return data
        data = data.select(mask_ops.box_nms(data.boxes, data.iou_preds, self.settings.box_nms_thresh))
        data.boxes = data.boxes + np.array([x0, y0, x0, y0], dtype=np.int64)
        data.points = data.points + np.array([x0, y0], dtype=np.float64)
        return data

    def _process_batch(self, points: np.ndarray, crop_box: List[int], size: Tuple[int, int]) -> MaskRecords:
        s = self.settings
        height, width = size
        filtered = callable(getattr(self.source, "predict_above", None))
        if filtered:
            # Predicted IoU needs no mask: the source computes masks only for outputs that pass it.
            iou, keep_idx, logits = self.source.predict_above(points, s.pred_iou_thresh)  # logits in keep_idx order
        else:
            logits, iou = self.source.predict(points)  # (B, 3, h', w'), (B, 3)
            logits = logits.flatten(0, 1)
        per_point = iou.shape[1]
        iou = iou.flatten(0, 1).float()
        if not filtered:
            keep = torch.ones(len(iou), dtype=torch.bool) if s.pred_iou_thresh <= 0 else iou > s.pred_iou_thresh
            keep_idx = torch.nonzero(keep.cpu()).flatten()
        point_index = np.repeat(np.arange(len(points)), per_point)
        masks_kept: List[np.ndarray] = []
        index_kept: List[np.ndarray] = []
        stability_kept: List[np.ndarray] = []
        threshold = self.mask_threshold
        for start in range(0, len(keep_idx), self.upscale_chunk):
            idx = keep_idx[start : start + self.upscale_chunk]
            rows = torch.arange(start, start + len(idx)) if filtered else idx
            full = self.source.upscale(logits[rows.to(logits.device)])  # (c, h, w) float
            on_device = torch.is_tensor(full) and not full.is_cpu
            if on_device:  # (a GPU: scored and thresholded there, only the kept masks come back, as bool)
                stability = mask_ops.stability_score_torch(full, threshold, s.stability_score_offset).cpu().numpy()
            else:
                full = mask_ops.as_numpy(full)
                stability = mask_ops.stability_score(full, threshold, s.stability_score_offset)
            if s.stability_score_thresh > 0:
                sel = np.flatnonzero(stability >= np.float32(s.stability_score_thresh))
            else:
                sel = np.arange(len(stability))
            if len(sel) == 0:
                continue
            if on_device:
                masks_kept.append((full[torch.as_tensor(sel, device=full.device)] > threshold).cpu().numpy())
            else:
                masks_kept.append(full[sel] > full.dtype.type(threshold))  # bool: no float copy is kept
            index_kept.append(idx.numpy()[sel])
            stability_kept.append(stability[sel])
            del full
        if not masks_kept:
            return MaskRecords(size)
        masks = np.concatenate(masks_kept)  # (M, h, w) bool
        index = np.concatenate(index_kept)
        stability = np.concatenate(stability_kept)
        boxes = mask_ops.masks_to_boxes(masks)
        inside = ~mask_ops.is_box_near_crop_edge(boxes, crop_box, [0, 0, width, height])
        if not inside.all():
            sel = np.flatnonzero(inside)
            masks, boxes, index, stability = masks[sel], boxes[sel], index[sel], stability[sel]
        out = MaskRecords(size)
        out.counts = rle_io.mask_counts(mask_ops.uncrop_masks(masks, crop_box, height, width))
        out.boxes = boxes.astype(np.int64)
        out.iou_preds = iou.cpu().numpy()[index]
        out.points = points[point_index[index]]
        out.stability = stability.astype(np.float32)
        out.crop_boxes = np.tile(np.asarray(crop_box, dtype=np.int64), (len(index), 1))
        return out

    @staticmethod
    def _remove_small_regions(data: MaskRecords, min_area: int, nms_thresh: float) -> MaskRecords:
        """Fill small holes and drop small islands of every mask, then remove new duplicates by NMS,
        preferring masks that needed no change (released behaviour)."""
        masks = data.masks()
        unchanged = np.zeros(len(masks), dtype=np.float32)
        for i in range(len(masks)):
            m, changed_holes = mask_ops.remove_small_regions(masks[i], min_area, "holes")
            m, changed_islands = mask_ops.remove_small_regions(m, min_area, "islands")
            masks[i] = m
            unchanged[i] = float(not (changed_holes or changed_islands))
        boxes = mask_ops.masks_to_boxes(masks)
        keep = mask_ops.box_nms(boxes, unchanged, nms_thresh)
        out = data.select(keep)
        changed_kept = [j for j, i in enumerate(keep) if unchanged[i] == 0.0]
        if changed_kept:
            source_idx = keep[changed_kept]
            new_counts = rle_io.mask_counts(masks[source_idx])
            for j, counts in zip(changed_kept, new_counts):
                out.counts[j] = counts
            out.boxes[changed_kept] = boxes[source_idx]
        return out


class SamAutomaticMaskGenerator:
    """The released interface: SamAutomaticMaskGenerator(model, ...).generate(image) -> list of dicts.

    A thin layer over MaskGenerator + AmgSettings; same arguments and defaults as released.
    """

    def __init__(
        self,
        model: Any,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
    ) -> None:
        settings = AmgSettings(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
        )
        self.generator = MaskGenerator(model, settings)
        # Released attribute names, for code that reads them.
        for f in fields(AmgSettings):
            setattr(self, f.name, getattr(self.generator.settings, f.name))
        self.point_grids = self.generator.point_grids
        self.predictor = getattr(self.generator.source, "segmenter", None)

    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        return self.generator.generate(image)
