"""`segany everything`: automatic masks for images (one image, folders, or list files).

Per image it writes DIR/<name>.json (SA-1B per-image format) or, with --format coco, DIR/<name>.coco.json
(a one-image COCO file) and at the end DIR/instances.json merging every input image. Existing valid
outputs are skipped, so an interrupted run resumes; an image that fails is reported and skipped.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import click

from .batch import ray_options, run_everything_batch, wants_batch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
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
@click.option("--tolerance", default=1.0, show_default=True, help="Polygon simplification tolerance in pixels.")
@click.option("--points-per-side", default=32, show_default=True, type=int)
@click.option("--points-per-batch", default=64, show_default=True, type=int)
@click.option("--pred-iou-thresh", default=0.88, show_default=True, type=float)
@click.option("--stability-score-thresh", default=0.95, show_default=True, type=float)
@click.option("--stability-score-offset", default=1.0, show_default=True, type=float)
@click.option("--box-nms-thresh", default=0.7, show_default=True, type=float)
@click.option("--crop-n-layers", default=0, show_default=True, type=int)
@click.option("--crop-nms-thresh", default=0.7, show_default=True, type=float)
@click.option("--crop-overlap-ratio", default=512 / 1500, show_default=True, type=float)
@click.option("--crop-n-points-downscale-factor", default=1, show_default=True, type=int)
@click.option("--min-mask-region-area", default=0, show_default=True, type=int)
@ray_options
def everything(paths: Tuple[str, ...], checkpoint: str, out_dir: str, fmt: str, viz: bool, cutouts: bool,
               fast: bool, device: str, recursive: bool, polygons: bool, tolerance: float, ray_address, actors,
               batch_size, cpus_per_actor, gpus_per_actor, **generator_options) -> None:
    """Segment everything in PATHS (images, folders, or .txt lists of image paths).

    \b
    Examples:
      segany everything photo.jpg --checkpoint vit_b --out masks/
      segany everything photos/ --checkpoint sam_vit_b.pth --out masks/ --format coco --viz
      segany everything list.txt -c vit_b -o masks/ --crop-n-layers 1 --min-mask-region-area 100
      segany everything manifest.csv -c vit_b -o masks/ --format sa1b+parquet --ray
    """
    if wants_batch(paths, fmt, ray_address):  # Ray, Parquet, manifests, tar shards: segany.batch
        return run_everything_batch(paths, checkpoint, out_dir, fmt, fast, device, recursive,
                                    {"viz": viz, "cutouts": cutouts, "polygons": polygons}, generator_options,
                                    ray_address, actors, batch_size, cpus_per_actor, gpus_per_actor)
    from tqdm import tqdm

    from ..predict.amg import AmgSettings

    settings = AmgSettings(**generator_options, output_mode="uncompressed_rle").validate()
    images = collect_images(paths, recursive)
    names = output_names(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(img, name) for img, name in zip(images, names) if not _is_done(_output_path(out, name, fmt), fmt)]
    skipped = len(images) - len(todo)
    failed: List[Tuple[Path, str]] = []
    n_masks = 0
    start = time.perf_counter()
    if todo:
        import segany
        from ..predict.amg import MaskGenerator

        model = segany.load_model(checkpoint, mode="fast" if fast else "exact", device=device)
        generator = MaskGenerator(model, settings)
        with tqdm(todo, unit="img", desc="everything", dynamic_ncols=True) as bar:
            for image_path, name in bar:
                try:
                    n_masks += _process_one(generator, image_path, name, out, fmt, viz, cutouts, polygons, tolerance)
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
                 polygons: bool, tolerance: float) -> int:
    from ..io import coco as coco_io
    from ..io import sa1b
    from ..predict.inputs import load_image

    image = load_image(image_path)
    h, w = image.shape[:2]
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
                        {"width": w, "height": h, "file_name": image_path.name})
    else:
        doc = coco_io.coco_document()
        coco_io.add_image(doc, image_path.name, h, w, annotations, polygons=polygons, tolerance=tolerance)
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
