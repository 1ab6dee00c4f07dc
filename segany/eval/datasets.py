"""Benchmark readers that stream one image (with all its instances) at a time.

Two layouts:
- image + mask folders (GrabCut, DAVIS-345, your own data): `images/<id>.<ext>`, `masks/<id>.png`
  (any non-zero value is the object: 255 for GrabCut, 1 for DAVIS), and optionally `ignore/<id>.png`
  (non-zero = pixels left out of the IoU, e.g. GrabCut's uncertain border band);
- COCO instances JSON (polygons, uncompressed and compressed RLE). Crowd annotations are not evaluated
  as instances; their pixels form every instance's ignore mask (they are neither right nor wrong).

Each item is an `ImageSample` with its instances; the image is read from disk only when the item is
produced, so a whole benchmark is never in memory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..predict.inputs import load_image

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Names accepted by open_dataset, resolved under the datasets root.
KNOWN_DATASETS: Dict[str, str] = {"grabcut": "grabcut", "davis345": "davis345", "coco": "coco-mini"}


@dataclass
class Instance:
    mask: np.ndarray  # (H, W) bool, the object
    ignore: Optional[np.ndarray] = None  # (H, W) bool, pixels excluded from IoU and from clicks
    category_id: int = 1
    annotation_id: Optional[int] = None

    @property
    def box(self) -> np.ndarray:
        """Tight box x0, y0, x1, y1 of the mask in pixel-edge coordinates (x1 = last column + 1)."""
        ys, xs = np.nonzero(self.mask)
        if len(xs) == 0:
            return np.zeros(4, dtype=np.float64)
        return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@dataclass
class ImageSample:
    image_id: Any  # file stem for folders, the integer COCO id for COCO
    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: List[Instance] = field(default_factory=list)
    # COCO boxes are given in the annotation (x, y, w, h); kept so the box protocol uses them as given
    boxes: Optional[List[np.ndarray]] = None


class MaskFolderDataset:
    """`root/images/<id>.*` with `root/masks/<id>.png` and optional `root/ignore/<id>.png`."""

    def __init__(self, root: PathLike, name: Optional[str] = None, images: str = "images",
                 masks: str = "masks", ignore: str = "ignore") -> None:
        self.root = Path(root)
        self.name = name or self.root.name
        self.image_dir = self.root / images
        self.mask_dir = self.root / masks
        self.ignore_dir = self.root / ignore
        if not self.image_dir.is_dir() or not self.mask_dir.is_dir():
            raise ValueError(f"{self.root} is not a mask-folder dataset: it needs {images}/ and {masks}/ folders")
        self.items: List[Tuple[str, Path, Path]] = []
        for path in sorted(self.image_dir.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            mask = self.mask_dir / f"{path.stem}.png"
            if mask.is_file():
                self.items.append((path.stem, path, mask))
        if not self.items:
            raise ValueError(f"no image in {self.image_dir} has a mask in {self.mask_dir} (<id>.png)")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_ignore(self) -> bool:
        return self.ignore_dir.is_dir()

    def __iter__(self) -> Iterator[ImageSample]:
        for image_id, image_path, mask_path in self.items:
            image = load_image(image_path)
            mask = _read_binary(mask_path)
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask {mask_path} is {mask.shape}, its image is {image.shape[:2]}")
            ignore = None
            ignore_path = self.ignore_dir / f"{image_id}.png"
            if ignore_path.is_file():
                ignore = _read_binary(ignore_path)
                if ignore.shape != mask.shape:
                    raise ValueError(f"ignore mask {ignore_path} is {ignore.shape}, its image is {mask.shape}")
                ignore &= ~mask  # the object itself is never ignored
            yield ImageSample(image_id, image, [Instance(mask, ignore)])


class CocoDataset:
    """COCO instances JSON + an image folder. Masks come from pycocotools (polygons and RLE)."""

    def __init__(self, annotations: PathLike, image_dir: Optional[PathLike] = None,
                 name: Optional[str] = None) -> None:
        from pycocotools.coco import COCO

        self.annotation_file = Path(annotations)
        if not self.annotation_file.is_file():
            raise ValueError(f"COCO annotation file not found: {self.annotation_file}")
        if image_dir is None:
            image_dir = _guess_coco_image_dir(self.annotation_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise ValueError(f"COCO image folder not found: {self.image_dir}")
        self.name = name or self.annotation_file.stem
        try:
            with open(self.annotation_file, "r", encoding="utf-8") as handle:
                dataset = json.load(handle)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.annotation_file} is not valid JSON: {exc}") from None
        for key in ("images", "annotations"):
            if key not in dataset:
                raise ValueError(f"{self.annotation_file} is not a COCO instances file: no '{key}'")
        dataset.setdefault("categories", [])
        self.coco = COCO()
        self.coco.dataset = dataset
        _quiet(self.coco.createIndex)
        # images that exist on disk and have at least one non-crowd instance
        self.image_ids: List[int] = []
        for image_id in sorted(self.coco.imgs):
            info = self.coco.imgs[image_id]
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
            if any(not a.get("iscrowd", 0) for a in anns) and (self.image_dir / info["file_name"]).is_file():
                self.image_ids.append(image_id)
        if not self.image_ids:
            raise ValueError(f"no image of {self.annotation_file} with instances was found in {self.image_dir}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __iter__(self) -> Iterator[ImageSample]:
        for image_id in self.image_ids:
            info = self.coco.imgs[image_id]
            image = load_image(self.image_dir / info["file_name"])
            h, w = image.shape[:2]
            if (info.get("height", h), info.get("width", w)) != (h, w):
                raise ValueError(f"image {info['file_name']} is {h}x{w}, the annotations say "
                                 f"{info.get('height')}x{info.get('width')}")
            anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
            crowd = np.zeros((h, w), dtype=bool)
            for ann in anns:
                if ann.get("iscrowd", 0):
                    crowd |= self.coco.annToMask(ann).astype(bool)
            instances, boxes = [], []
            for ann in anns:
                if ann.get("iscrowd", 0):
                    continue
                mask = self.coco.annToMask(ann).astype(bool)
                if not mask.any():
                    continue  # degenerate annotation: nothing to click on or to score
                ignore = (crowd & ~mask) if crowd.any() else None
                instances.append(Instance(mask, ignore, int(ann.get("category_id", 1)), int(ann["id"])))
                x, y, bw, bh = ann.get("bbox") or _xywh(instances[-1].box)
                boxes.append(np.array([x, y, x + bw, y + bh], dtype=np.float64))
            yield ImageSample(image_id, image, instances, boxes)


def _xywh(box: np.ndarray) -> List[float]:
    return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]


def _quiet(fn) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        fn()


def _read_binary(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as opened:
        array = np.asarray(opened)
    if array.ndim == 3:  # an RGB(A) mask: any channel set
        array = array[..., :3].max(axis=2)
    return array > 0


def _guess_coco_image_dir(annotation_file: Path) -> Path:
    """instances_val2017.json -> <root>/val2017 (the COCO layout), else the JSON's folder."""
    stem = annotation_file.stem
    split = stem.split("_", 1)[1] if stem.startswith("instances_") else stem
    for candidate in (annotation_file.parent.parent / split, annotation_file.parent / split,
                      annotation_file.parent.parent / "images", annotation_file.parent / "images"):
        if candidate.is_dir():
            return candidate
    return annotation_file.parent


def default_datasets_root() -> Optional[Path]:
    """$SEGANY_DATASETS, else ./datasets, else ../shared/datasets (the segany workplace layout)."""
    candidates = []
    if os.environ.get("SEGANY_DATASETS"):
        candidates.append(Path(os.environ["SEGANY_DATASETS"]))
    candidates += [Path.cwd() / "datasets", Path.cwd().parent / "shared" / "datasets"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def open_dataset(spec: PathLike, root: Optional[PathLike] = None, split: str = "val2017"):
    """A dataset from a known name (grabcut, davis345, coco) or a path.

    A path may be a mask-folder dataset (with images/ and masks/), a COCO JSON file, or a COCO root
    (annotations/instances_<split>.json and <split>/).
    """
    text = str(spec)
    name = None
    if text in KNOWN_DATASETS:
        base = Path(root) if root is not None else default_datasets_root()
        if base is None:
            raise ValueError(f"dataset {text!r}: no datasets folder found; pass --data-root or set SEGANY_DATASETS")
        name = text
        path = base / KNOWN_DATASETS[text]
    else:
        path = Path(text)
    if not path.exists():
        raise ValueError(f"dataset not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"dataset file {path} is not a COCO JSON file")
        return CocoDataset(path, name=name)
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return MaskFolderDataset(path, name=name)
    annotation = path / "annotations" / f"instances_{split}.json"
    if annotation.is_file():
        return CocoDataset(annotation, path / split, name=name or f"{path.name}:{split}")
    raise ValueError(f"{path} is neither a mask-folder dataset (images/, masks/) nor a COCO root "
                     f"(annotations/instances_{split}.json)")


def limited(dataset, limit: Optional[int]) -> Iterator[ImageSample]:
    """The first `limit` images of a dataset (all when None)."""
    for i, sample in enumerate(dataset):
        if limit is not None and i >= limit:
            return
        yield sample


def dataset_length(dataset, limit: Optional[int]) -> int:
    n = len(dataset)
    return n if limit is None else min(n, limit)


__all__: Sequence[str] = ["CocoDataset", "ImageSample", "Instance", "MaskFolderDataset", "open_dataset",
                          "default_datasets_root", "limited", "dataset_length"]
