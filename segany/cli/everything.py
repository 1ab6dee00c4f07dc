"""`segany everything`: automatic masks for images (one image, folders, or list files).

Per image it writes DIR/<name>.json (SA-1B per-image format) or, with --format coco, DIR/<name>.coco.json
(a one-image COCO file) and at the end DIR/instances.json merging every input image. Existing valid
outputs are skipped, so an interrupted run resumes; an image that fails is reported and skipped.
DIR/segany-run.json records the checkpoint's SHA-256 and every setting that changes the masks: resuming
into a folder made with another checkpoint or other settings stops with the difference (--overwrite
starts over).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click

from ..io.sa1b import sa1b_image_ids
from .batch import ray_options, run_everything_batch, wants_batch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
RUN_LOG = "segany-run.json"
LIST_SUFFIXES = {".txt", ".lst", ".list"}


def collect_images(paths: Sequence[str], recursive: bool = False) -> List[Path]:
    """Image files from files, folders and list files (one path per line, relative to the list)."""
    found: List[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    found.append(entry if entry.is_absolute() else path.parent / entry)
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"not found: {path}")
    unique: Dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)
    if not unique:
        raise ValueError("no images found in " + ", ".join(paths))
    return list(unique.values())


def output_names(images: Sequence[Path]) -> List[str]:
    """File stems, made unique with a short hash of the path where two images share a stem."""
    stems = [p.stem for p in images]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [
        s if counts[s] == 1 else f"{s}_{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
        for s, p in zip(stems, images)
    ]


def display_names(images: Sequence[Path]) -> List[str]:
    """The file_name each image gets in the outputs: its name, or its path below the inputs' common folder
    where two images share a name (so instances.json never lists two images as the same file)."""
    names = [p.name for p in images]
    if len(set(names)) == len(names):
        return names
    resolved = [p.resolve() for p in images]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    return [n if names.count(n) == 1 else r.relative_to(root).as_posix() for n, r in zip(names, resolved)]


def check_run_log(out: Path, run: Dict, names: Sequence[str], fmt: str, overwrite: bool) -> None:
    """Refuse to resume into `out` unless it was made by the same checkpoint and settings; record `run`."""
    from ..io.atomic import atomic_write_bytes

    log = out / RUN_LOG
    run = json.loads(json.dumps(run))  # as it reads back (tuples become lists)
    if not overwrite:
        if log.is_file():
            try:
                previous = json.loads(log.read_text())
            except (OSError, ValueError):
                previous = {}
            if previous != run:
                keys = sorted(set(previous) | set(run))
                diff = [f"{k}: {previous.get(k)!r} -> {run.get(k)!r}" for k in keys if previous.get(k) != run.get(k)]
                changed = "; ".join(d[:160] for d in diff[:4])
                raise click.UsageError(f"{out} holds results of another run ({changed}): pass --overwrite to start "
                                       "over, or choose another --out")
        elif any(_output_path(out, n, fmt).is_file() for n in names):
            raise click.UsageError(f"{out} holds results without a {RUN_LOG} (which checkpoint and settings made them "
                                   "is unknown): pass --overwrite to start over, or choose another --out")
    atomic_write_bytes(log, (json.dumps(run, indent=1, sort_keys=True) + "\n").encode())


def _output_path(out: Path, name: str, fmt: str) -> Path:
    return out / (f"{name}.json" if fmt == "sa1b" else f"{name}.coco.json")


def _is_done(path: Path, fmt: str) -> bool:
    from ..io import coco as coco_io
    from ..io import sa1b

    if not path.is_file():
        return False
    try:
        if fmt == "sa1b":
            sa1b.read_sa1b(path)
        else:
            coco_io.read_coco(path)
        return True
    except ValueError:
        return False


@click.command("everything")
@click.argument("paths", nargs=-1, required=True)
@click.option("--checkpoint", "-c", required=True, help="Checkpoint file or model name.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--format", "fmt", type=click.Choice(["sa1b", "coco", "parquet", "sa1b+parquet"]), default="sa1b",
              show_default=True, help="sa1b: one JSON per image; coco: one COCO file per image plus instances.json; "
              "parquet: Parquet shards of COCO RLE (see docs/scale.md).")
@click.option("--viz", is_flag=True, help="Also write <name>.overlay.png: all masks coloured and outlined.")
@click.option("--cutouts", is_flag=True, help="Also write <name>_cutouts/<i>.png: each mask as a transparent cut-out.")
@click.option("--fast", is_flag=True, help='Load the model in mode="fast" (faster, not bit-exact).')
@click.option("--device", default="cpu", show_default=True)
@click.option("--recursive", "-r", is_flag=True, help="Search folders recursively.")
@click.option("--polygons", is_flag=True, help="COCO: polygons (masks without holes) instead of RLE.")
@click.option("--tolerance", default=1.0, show_default=True, type=click.FloatRange(0),
              help="Polygon simplification tolerance in pixels.")
@click.option("--points-per-side", default=32, show_default=True, type=click.IntRange(1, 1024))
@click.option("--points-per-batch", default=64, show_default=True, type=click.IntRange(1))
@click.option("--pred-iou-thresh", default=0.88, show_default=True, type=click.FloatRange(0, 1))
@click.option("--stability-score-thresh", default=0.95, show_default=True, type=click.FloatRange(0, 1))
@click.option("--stability-score-offset", default=1.0, show_default=True, type=click.FloatRange(0))
@click.option("--box-nms-thresh", default=0.7, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--crop-n-layers", default=0, show_default=True, type=click.IntRange(0, 4))
@click.option("--crop-nms-thresh", default=0.7, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--crop-overlap-ratio", default=512 / 1500, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--crop-n-points-downscale-factor", default=1, show_default=True, type=click.IntRange(1))
@click.option("--min-mask-region-area", default=0, show_default=True, type=click.IntRange(0))
@click.option("--conf", type=float, default=None, help="FastSAM: confidence threshold (default 0.4).")
@click.option("--iou", type=float, default=None, help="FastSAM: NMS IoU threshold (default 0.9).")
@click.option("--imgsz", type=int, default=None, help="FastSAM: inference size, longer side (default 1024).")
@click.option("--level", "levels", metavar="L[,L...]",
              help="Semantic-SAM only: granularity level(s) 1 (coarsest) .. 6 (finest), e.g. 3 or 1,3,6 (default: all six).")
@ray_options
@click.option("--overwrite", is_flag=True,
              help="Start over in --out even if it holds results of another checkpoint or other settings.")
def everything(paths: Tuple[str, ...], checkpoint: str, out_dir: str, fmt: str, viz: bool, cutouts: bool,
               fast: bool, device: str, recursive: bool, polygons: bool, tolerance: float, overwrite: bool,
               conf: Optional[float], iou: Optional[float], imgsz: Optional[int], levels: Optional[str] = None,
               ray_address=None, actors=None, batch_size=None, cpus_per_actor=None, gpus_per_actor=None,
               **generator_options) -> None:
    """Segment everything in PATHS (images, folders, or .txt lists of image paths).

    \b
    Examples:
      segany everything photo.jpg --checkpoint vit_b --out masks/
      segany everything photos/ --checkpoint sam_vit_b.pth --out masks/ --format coco --viz
      segany everything list.txt -c vit_b -o masks/ --crop-n-layers 1 --min-mask-region-area 100
      segany everything photos/ -c fastsam-s -o masks/ --conf 0.4 --iou 0.9 --imgsz 1024
      segany everything photo.jpg -c semantic-sam-t --level 3 -o masks/
      segany everything manifest.csv -c vit_b -o masks/ --format sa1b+parquet --ray
    """
    if wants_batch(paths, fmt, ray_address):  # Ray, Parquet, manifests, tar shards: segany.batch
        if conf is not None or iou is not None or imgsz is not None or levels is not None:
            raise ValueError("--conf, --iou, --imgsz and --level are not available with --ray, Parquet, manifests or "
                             "tar shards yet: run those models on images, folders or lists")
        return run_everything_batch(paths, checkpoint, out_dir, fmt, fast, device, recursive,
                                    {"viz": viz, "cutouts": cutouts, "polygons": polygons}, generator_options,
                                    ray_address, actors, batch_size, cpus_per_actor, gpus_per_actor)
    from tqdm import tqdm

    from ..io.device import check_device
    from ..io.models import resolve_checkpoint
    from ..io.zoo import sha256_of
    from ..predict.amg import AmgSettings

    from ..predict.semantic_sam_amg import check_levels, semantic_sam_defaults_for

    level_list = check_levels([t for t in levels.split(",")]) if levels is not None else None
    settings = AmgSettings(**generator_options, output_mode="uncompressed_rle").validate()
    check_device(device)
    fastsam_options = {k: v for k, v in (("conf", conf), ("iou", iou), ("imgsz", imgsz)) if v is not None}
    if fastsam_options:
        from ..predict.fastsam import FastSamSettings

        FastSamSettings(**fastsam_options).validate()  # bad values fail before any work
    images = collect_images(paths, recursive)
    names = output_names(images)
    file_names = display_names(images)
    ids = sa1b_image_ids([p.stem for p in images])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = resolve_checkpoint(checkpoint)
    run_key = {"checkpoint_sha256": sha256_of(path), "mode": "fast" if fast else "exact", "format": fmt,
               **{k: v for k, v in settings.to_dict().items() if k != "output_mode"}}
    if fmt == "coco":
        run_key.update(polygons=polygons, tolerance=tolerance)
    if fastsam_options:
        run_key.update(fastsam=fastsam_options)
    if level_list is not None:
        run_key.update(levels=list(level_list))
    check_run_log(out, run_key, names, fmt, overwrite)
    todo = [(img, name, file_name, image_id) for img, name, file_name, image_id in zip(images, names, file_names, ids)
            if overwrite or not _is_done(_output_path(out, name, fmt), fmt)]
    skipped = len(images) - len(todo)
    failed: List[Tuple[Path, str]] = []
    n_masks = 0
    start = time.perf_counter()
    if todo:
        import segany
        from ..predict.amg import MaskGenerator

        from ..modeling.yolov8_seg import YoloV8Seg

        model = segany.load_model(path, mode="fast" if fast else "exact", device=device)
        if isinstance(model, YoloV8Seg):  # FastSAM: one network pass gives every mask
            from ..predict.fastsam import FastSam, FastSamSettings

            if level_list is not None:
                raise ValueError("--level needs a Semantic-SAM checkpoint (e.g. -c semantic-sam-t)")
            generator = FastSam(model, FastSamSettings(**fastsam_options))
        elif fastsam_options:
            raise ValueError("--conf, --iou and --imgsz apply to FastSAM models only")
        else:
            source = semantic_sam_defaults_for(model, level_list, settings, click.get_current_context())
            generator = MaskGenerator(source or model, settings)
        with tqdm(todo, unit="img", desc="everything", dynamic_ncols=True) as bar:
            for image_path, name, file_name, image_id in bar:
                try:
                    n_masks += _process_one(generator, image_path, name, out, fmt, viz, cutouts, polygons, tolerance,
                                            file_name, image_id)
                except (ValueError, OSError, RuntimeError) as exc:
                    failed.append((image_path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
                    bar.write(f"failed: {image_path}: {failed[-1][1]}")
                bar.set_postfix(masks=n_masks, failed=len(failed))
    if fmt == "coco":
        _merge_coco(out, images, names)
    elapsed = time.perf_counter() - start
    done = len(todo) - len(failed)
    rate = f", {done / elapsed:.2f} images/s" if done and elapsed > 0 else ""
    click.echo(
        f"{done} image(s) segmented ({n_masks} masks){rate}; {skipped} already done; {len(failed)} failed; "
        f"output in {out}"
    )
    for path, reason in failed:
        click.echo(f"  failed: {path}: {reason}", err=True)
    if failed:
        raise SystemExit(1)


def _process_one(generator, image_path: Path, name: str, out: Path, fmt: str, viz: bool, cutouts: bool,
                 polygons: bool, tolerance: float, file_name: Optional[str] = None, image_id: int = 1) -> int:
    from ..io import coco as coco_io
    from ..io import sa1b
    from ..predict.inputs import load_image

    image = load_image(image_path)
    h, w = image.shape[:2]
    file_name = file_name or image_path.name
    records = generator.generate_records(image)
    annotations = records.to_annotations("uncompressed_rle")
    # Pictures first: the JSON is what marks an image as done.
    if viz or cutouts:
        from ..io import viz as viz_io

        masks = records.masks()
        if viz:
            order = sorted(range(len(masks)), key=lambda i: -int(masks[i].sum()))  # small masks on top
            viz_io.save_png(out / f"{name}.overlay.png", viz_io.overlay_masks(image, masks[order]) if len(masks) else image)
        if cutouts:
            for i, mask in enumerate(masks):
                viz_io.save_png(out / f"{name}_cutouts" / f"{i:04d}.png", viz_io.cutout_rgba(image, mask))
    if fmt == "sa1b":
        sa1b.write_sa1b(_output_path(out, name, fmt), annotations,
                        {"image_id": image_id, "width": w, "height": h, "file_name": file_name})
    else:
        doc = coco_io.coco_document()
        coco_io.add_image(doc, file_name, h, w, annotations, polygons=polygons, tolerance=tolerance,
                          image_id=image_id)
        coco_io.write_coco(_output_path(out, name, fmt), doc)
    return len(annotations)


def _merge_coco(out: Path, images: Sequence[Path], names: Sequence[str]) -> Optional[Path]:
    from ..io import coco as coco_io

    docs = []
    for name in names:
        path = _output_path(out, name, "coco")
        if path.is_file():
            try:
                docs.append(coco_io.read_coco(path))
            except ValueError:
                continue
    if not docs:
        return None
    return coco_io.write_coco(out / "instances.json", coco_io.merge_documents(docs))
