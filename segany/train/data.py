"""Training data: COCO instances JSON (+ image folder; the annotation tool's export is one), SA-1B
per-image JSON, and image/mask folders, with augmentation that keeps masks aligned.

A data spec names a source on the command line:
    coco:ANNOTATIONS.json[,IMAGE_DIR]     images resolved against IMAGE_DIR, else beside the JSON
    sa1b:DIR                               DIR/<name>.jpg with DIR/<name>.json (SA-1B layout)
    folder:IMAGE_DIR,MASK_DIR[,IGNORE_DIR] masks as PNGs of the same stem; each non-zero value is one
                                           instance; IGNORE_DIR (255 = ignored) is used by validation
and an optional `@START:STOP` keeps that slice of the source's records in sorted order.

Every sample is decided by (seed, epoch, index) alone, so the data order and the augmentation are the
same in any number of DataLoader workers and after a resume.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ..predict.inputs import pil_to_rgb
from ..predict.transforms import preprocess_shape

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------- records


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO polygons, uncompressed RLE or compressed RLE -> (H, W) bool."""
    if isinstance(segmentation, list):  # polygons
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):  # uncompressed
            rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
        else:
            counts = segmentation["counts"]
            rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unsupported segmentation format: {type(segmentation).__name__}")
    mask = mask_utils.decode(rle).astype(bool)
    if mask.shape != (height, width):
        raise ValueError(f"segmentation of size {mask.shape} on an image of size {(height, width)}")
    return mask


@dataclass
class ImageRecord:
    """One image and how to get its instance masks."""

    image: Path
    kind: str  # "coco" (annotations inline), "mask" (a label PNG), "sa1b" (a per-image JSON)
    annotations: List[dict] = field(default_factory=list)
    mask_file: Optional[Path] = None
    ignore_file: Optional[Path] = None
    size: Optional[Tuple[int, int]] = None  # (h, w) when the source states it

    def load_image(self) -> np.ndarray:
        try:
            with Image.open(self.image) as im:
                return np.array(pil_to_rgb(im))  # 16-bit / float / transparent images as a viewer shows them
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {self.image}: {exc}") from None

    def annotation_list(self) -> List[dict]:
        if self.kind == "sa1b" and not self.annotations:
            data = json.loads(Path(self.mask_file).read_text())
            return data.get("annotations", [])
        return self.annotations

    def instance_masks(self, height: int, width: int, choose: Optional[Sequence[int]] = None) -> np.ndarray:
        """(K, H, W) bool; `choose` picks instances by index (decoding only those)."""
        if self.kind == "mask":
            with Image.open(self.mask_file) as im:
                label = np.array(im)
            if label.ndim == 3:
                label = label[..., 0]
            if label.shape != (height, width):
                raise ValueError(f"mask {self.mask_file} is {label.shape}, image {self.image} is {(height, width)}")
            values = [v for v in np.unique(label) if v != 0]
            if choose is not None:
                values = [values[i] for i in choose]
            return np.stack([label == v for v in values]) if values else np.zeros((0, height, width), bool)
        anns = self.annotation_list()
        if choose is not None:
            anns = [anns[i] for i in choose]
        if not anns:
            return np.zeros((0, height, width), bool)
        return np.stack([decode_segmentation(a["segmentation"], height, width) for a in anns])

    def num_instances(self) -> int:
        if self.kind == "mask":
            with Image.open(self.mask_file) as im:
                label = np.array(im)
            return int(len([v for v in np.unique(label) if v != 0]))
        return len(self.annotation_list())

    def ignore_mask(self) -> Optional[np.ndarray]:
        if self.ignore_file is None or not Path(self.ignore_file).is_file():
            return None
        with Image.open(self.ignore_file) as im:
            ignore = np.array(im)
        return (ignore[..., 0] if ignore.ndim == 3 else ignore) > 127


def coco_records(annotations: Union[str, Path], image_dir: Optional[Union[str, Path]] = None, min_area: float = 0.0) -> List[ImageRecord]:
    """Images of a COCO instances JSON with their non-crowd annotations (images without any are skipped)."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise ValueError(f"COCO annotation file not found: {annotations}")
    try:
        data = json.loads(annotations.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{annotations} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotations} is not a COCO instances file (needs 'images' and 'annotations')")
    by_image: Dict[Any, List[dict]] = {}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0) or "segmentation" not in ann:
            continue
        if ann.get("area", min_area) < min_area:
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    roots = [Path(image_dir)] if image_dir else [annotations.parent, annotations.parent / "images"]
    records = []
    for info in data["images"]:
        anns = by_image.get(info["id"])
        if not anns:
            continue
        name = info["file_name"]
        candidates = [Path(name)] if os.path.isabs(name) else [root / name for root in roots]
        candidates += [root / Path(name).name for root in roots]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ValueError(f"image {name!r} of {annotations} not found (looked in {', '.join(map(str, roots))})")
        records.append(ImageRecord(path, "coco", anns, size=(info.get("height"), info.get("width"))))
    return records


def sa1b_records(folder: Union[str, Path]) -> List[ImageRecord]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"SA-1B folder not found: {folder}")
    records = []
    for js in sorted(folder.glob("*.json")):
        image = next((js.with_suffix(s) for s in IMAGE_SUFFIXES if js.with_suffix(s).is_file()), None)
        if image is not None:
            records.append(ImageRecord(image, "sa1b", mask_file=js))
    return records


def folder_records(image_dir: Union[str, Path], mask_dir: Union[str, Path], ignore_dir: Optional[Union[str, Path]] = None) -> List[ImageRecord]:
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise ValueError(f"folder not found: {d}")
    masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    records = []
    for image in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if image.stem in masks:
            ignore = Path(ignore_dir) / f"{image.stem}.png" if ignore_dir else None
            records.append(ImageRecord(image, "mask", mask_file=masks[image.stem], ignore_file=ignore))
    return records


def parse_data_spec(spec: str) -> List[ImageRecord]:
    """`coco:ANN.json[,IMAGES]`, `sa1b:DIR` or `folder:IMAGES,MASKS[,IGNORE]`, optionally `@START:STOP`."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"data spec {spec!r} must look like coco:ANN.json[,IMAGES], sa1b:DIR or folder:IMAGES,MASKS")
    window = None
    if "@" in rest:
        rest, _, window = rest.rpartition("@")
    parts = [p for p in rest.split(",") if p]
    if kind == "coco" and 1 <= len(parts) <= 2:
        records = coco_records(parts[0], parts[1] if len(parts) > 1 else None)
    elif kind == "sa1b" and len(parts) == 1:
        records = sa1b_records(parts[0])
    elif kind == "folder" and 2 <= len(parts) <= 3:
        records = folder_records(*parts)
    else:
        raise ValueError(f"bad data spec {spec!r}: coco:ANN.json[,IMAGES], sa1b:DIR or folder:IMAGES,MASKS[,IGNORE]")
    if window is not None:
        try:
            start, _, stop = window.partition(":")
            records = records[int(start or 0) : int(stop) if stop else None]
        except ValueError:
            raise ValueError(f"bad slice @{window} in data spec {spec!r}; use @START:STOP") from None
    if not records:
        raise ValueError(f"data spec {spec!r} gives no images with annotations")
    return records


# ---------------------------------------------------------------- augmentation


@dataclass
class AugmentConfig:
    flip: bool = True  # horizontal flip with probability 0.5
    scale_range: Tuple[float, float] = (1.0, 1.0)  # jitter of the fit-to-frame scale; > 1 then crops
    min_instance_area: int = 64  # px in the model frame; smaller instances are dropped

    @classmethod
    def none(cls) -> "AugmentConfig":
        return cls(flip=False, scale_range=(1.0, 1.0))


def resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, H, W) bool -> (K, height, width) bool, bilinear on 0/1 then threshold, as the image is resized."""
    if masks.shape[0] == 0:
        return np.zeros((0, height, width), bool)
    out = [cv2.resize(m.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5 for m in masks]
    return np.stack(out)


def augment(
    image: np.ndarray, masks: np.ndarray, side: int, cfg: AugmentConfig, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """Flip, scale jitter and crop, applied identically to the image and its masks.

    image (H, W, 3) uint8, masks (K, H, W) bool -> image (h, w, 3) and masks (K, h, w) with max(h, w) <= side;
    at scale 1 the resize is exactly the predictor's (longest side = `side`, PIL bilinear).
    """
    if cfg.flip and rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    lo, hi = cfg.scale_range
    jitter = float(rng.uniform(lo, hi)) if hi > lo else lo
    h, w = image.shape[:2]
    nh, nw = preprocess_shape(h, w, max(1, int(round(side * jitter))))
    if (nh, nw) != (h, w):
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((nw, nh), Image.BILINEAR))
        masks = resize_masks(masks, nh, nw)
    if nh > side or nw > side:
        top = int(rng.integers(nh - min(nh, side) + 1))
        left = int(rng.integers(nw - min(nw, side) + 1))
        image = image[top : top + side, left : left + side]
        masks = masks[:, top : top + side, left : left + side]
    return np.ascontiguousarray(image), np.ascontiguousarray(masks)


# ---------------------------------------------------------------- dataset


class InstanceDataset(torch.utils.data.Dataset):
    """Samples for training: the image in the model's S x S frame (top-left, zero-padded) and up to
    `max_instances` of its instance masks, chosen at random.

    Indexed by (epoch, index) — what `EpochSampler` yields — or a plain index (epoch 0).
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        side: int,
        max_instances: int = 4,
        augment_cfg: Optional[AugmentConfig] = None,
        seed: int = 0,
    ) -> None:
        if not records:
            raise ValueError("no training images")
        self.records = list(records)
        self.side = side
        self.max_instances = max_instances
        self.augment_cfg = augment_cfg or AugmentConfig.none()
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Dict[str, Any]:
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        rng = np.random.default_rng([self.seed, epoch, index])
        record = self.records[index]
        image = record.load_image()
        h, w = image.shape[:2]
        total = record.num_instances()
        # Pick more candidates than needed: small ones may vanish under the crop.
        order = rng.permutation(total)[: 2 * self.max_instances]
        masks = record.instance_masks(h, w, sorted(order.tolist()))
        base_image, base_masks = image, masks
        for attempt in range(2):
            cfg = self.augment_cfg if attempt == 0 else AugmentConfig(flip=False, min_instance_area=self.augment_cfg.min_instance_area)
            image, masks = augment(base_image, base_masks, self.side, cfg, rng)
            area = masks.reshape(masks.shape[0], -1).sum(1)
            keep = np.flatnonzero(area >= cfg.min_instance_area)
            if len(keep):
                break
        if len(keep) == 0:  # every instance is tiny: keep the largest rather than fail the step
            keep = np.argsort(-area)[:1]
        keep = rng.permutation(keep)[: self.max_instances]
        masks = masks[np.sort(keep)]
        ih, iw = image.shape[:2]
        frame = np.zeros((self.side, self.side, 3), np.uint8)
        frame[:ih, :iw] = image
        full_masks = np.zeros((masks.shape[0], self.side, self.side), bool)
        full_masks[:, :ih, :iw] = masks
        return {
            "image": torch.from_numpy(frame).permute(2, 0, 1).contiguous(),  # 3, S, S uint8
            "size": (ih, iw),
            "masks": torch.from_numpy(full_masks),  # K, S, S bool
            "name": str(record.image),
            "index": index,
            "epoch": epoch,
        }


class EpochSampler(torch.utils.data.Sampler):
    """Endless (epoch, index) keys: a seeded permutation per epoch, starting at a global position."""

    def __init__(self, size: int, seed: int = 0, start: int = 0, shuffle: bool = True) -> None:
        self.size, self.seed, self.start, self.shuffle = size, seed, start, shuffle

    def order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            for index in self.order(epoch)[offset:]:
                yield (epoch, index)
            epoch, offset = epoch + 1, 0


def collate_samples(samples: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return samples


def make_loader(dataset: InstanceDataset, images_per_step: int, start: int, workers: int, seed: int) -> torch.utils.data.DataLoader:
    """An endless DataLoader of lists of samples, starting at sample `start` of the endless order."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=images_per_step,
        sampler=EpochSampler(len(dataset), seed, start),
        num_workers=workers,
        collate_fn=collate_samples,
        persistent_workers=False,
        prefetch_factor=2 if workers > 0 else None,
    )


# ---------------------------------------------------------------- validation objects


@dataclass
class EvalObject:
    """One object to segment by clicks, at the image's own resolution."""

    name: str
    image_index: int  # objects of one image share its embedding
    gt: np.ndarray  # H, W bool
    ignore: Optional[np.ndarray]  # H, W bool or None


def eval_objects(records: Sequence[ImageRecord], max_per_image: int = 1, min_area: int = 100) -> Tuple[List[ImageRecord], List[EvalObject]]:
    """The largest `max_per_image` instances of each image as click-evaluation objects."""
    objects = []
    for i, record in enumerate(records):
        h, w = record.size if record.size and all(record.size) else Image.open(record.image).size[::-1]
        masks = record.instance_masks(h, w)
        areas = masks.reshape(masks.shape[0], -1).sum(1)
        ignore = record.ignore_mask()
        for k in np.argsort(-areas)[:max_per_image]:
            if areas[k] >= min_area:
                objects.append(EvalObject(f"{record.image.stem}#{k}", i, masks[k], ignore))
    return list(records), objects
