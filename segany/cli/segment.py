"""`segany segment`: masks for one image from point and/or box prompts, written as PNGs plus a JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click
import numpy as np

LOW_RES_FILE = "low_res_logits.npy"
BEST_LOW_RES_FILE = "best_low_res.npy"


def parse_numbers(text: str, what: str, counts: Sequence[int], example: str) -> List[float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in counts or any(p == "" for p in parts):
        raise ValueError(f"{what} {text!r} must be {example}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{what} {text!r} must be {example} (numbers only)") from None
    if not all(np.isfinite(values)):
        raise ValueError(f"{what} {text!r} must be finite numbers")
    return values


def parse_point(text: str) -> Tuple[float, float, int]:
    """'X,Y' (foreground) or 'X,Y,LABEL' with LABEL 1 (foreground) or 0 (background)."""
    values = parse_numbers(text, "--point", (2, 3), "X,Y or X,Y,LABEL, e.g. 320,200 or 40,60,0")
    label = 1 if len(values) == 2 else values[2]
    if label not in (0, 1):
        raise ValueError(f"--point {text!r}: LABEL must be 1 (foreground) or 0 (background), got {label:g}")
    return values[0], values[1], int(label)


def parse_box(text: str) -> List[float]:
    """'X0,Y0,X1,Y1': top-left and bottom-right corners in pixels."""
    values = parse_numbers(text, "--box", (4,), "X0,Y0,X1,Y1, e.g. 100,80,420,360")
    if values[2] < values[0] or values[3] < values[1]:
        raise ValueError(f"--box {text!r}: X1 must be >= X0 and Y1 >= Y0 (top-left corner first)")
    return values


def read_mask_input(path: Path) -> np.ndarray:
    """A (1, 256, 256) logit map from a .npy file written by an earlier `segany segment`."""
    if not path.is_file():
        raise ValueError(f"--mask-input file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--mask-input {path} is not a readable .npy array ({exc})") from None
    if array.ndim == 3 and array.shape[0] > 1:
        raise ValueError(
            f"--mask-input {path} holds {array.shape[0]} logit maps; pass one, e.g. the {BEST_LOW_RES_FILE} "
            "an earlier run wrote"
        )
    return array


def _json_ready(values: Any) -> Any:
    return np.asarray(values).tolist()


@click.command(
    "segment",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="""\b
Examples:
  # one foreground click
  segany segment photo.jpg -c sam_vit_b.pth --point 320,200 --out out/
  # a box, refined by a background click, three candidate masks
  segany segment photo.jpg -c vit_b --box 100,80,420,360 --point 250,300,0 --multimask --out out/
  # refine with the logits of the previous run
  segany segment photo.jpg -c vit_b --point 320,200 --point 90,40,0 \\
      --mask-input out/best_low_res.npy --out out2/
  # FastSAM: every proposal holding the click (--single: their union)
  segany segment photo.jpg -c fastsam-s --point 320,200 --multimask --out out/
  # the object a phrase describes (CLIP over everything mode's masks), 3 best
  segany segment photo.jpg -c vit_b --text "a dog" --top 3 --out out3/
""",
)
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "-c", "--checkpoint", required=True, metavar="CKPT",
    help="Checkpoint file (.pth or .safetensors; the model size is read from it) or a model name such as vit_b.",
)
@click.option(
    "-p", "--point", "points", multiple=True, metavar="X,Y[,LABEL]",
    help="A click in pixels (x right, y down). LABEL 1 = part of the object (default), 0 = not part of it. "
    "Repeat for more clicks.",
)
@click.option("-b", "--box", metavar="X0,Y0,X1,Y1", help="A box around the object: top-left and bottom-right corners in pixels.")
@click.option(
    "--mask-input", type=click.Path(path_type=Path), metavar="FILE.npy",
    help=f"Low-res logits (1x256x256) of an earlier prediction to refine, e.g. {BEST_LOW_RES_FILE} from a previous run.",
)
@click.option(
    "-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
    help="Output folder (created if needed) for mask_*.png, overlay.png and result.json.",
)
@click.option(
    "--multimask/--single", default=False,
    help="Return 3 candidate masks (whole object, part, sub-part) instead of 1. Best for a single ambiguous click.",
)
@click.option("--fast", is_flag=True, help="Use the fast CPU mode of the model (slightly different numbers, much quicker).")
@click.option("--cutout", is_flag=True, help="Also write cutout_*.png: the object on a transparent background.")
@click.option(
    "-g", "--granularity", metavar="1..6",
    help="Semantic-SAM only: one granularity level, 1 (coarsest) to 6 (finest). Without it, --multimask gives all six.",
)
@click.option("--device", default="cpu", show_default=True, help="Torch device to run on, e.g. cpu or cuda.")
@click.option("-t", "--text", "texts", multiple=True, metavar="PHRASE",
              help="Find the object a phrase describes among everything mode's masks, with CLIP (repeatable).")
@click.option("--negative", "negatives", multiple=True, metavar="PHRASE", help="With --text: a phrase the object is not.")
@click.option("--clip", metavar="NAME_OR_PATH", help="With --text: the CLIP model, a file or a name [default: clip_vit_b32].")
@click.option("--top", type=int, default=1, show_default=True, help="With --text: masks per phrase, best first.")
def segment(
    image: Path,
    checkpoint: str,
    points: Tuple[str, ...],
    box: Optional[str],
    mask_input: Optional[Path],
    out_dir: Path,
    multimask: bool,
    fast: bool,
    cutout: bool,
    device: str,
    granularity: Optional[str] = None,
    texts: Tuple[str, ...] = (),
    negatives: Tuple[str, ...] = (),
    clip: Optional[str] = None,
    top: int = 1,
) -> None:
    """Segment the object at the given clicks and/or box in IMAGE.

    Writes to DIR: mask_0.png ... (white = object; one per mask, best first when --multimask),
    overlay.png (masks and prompts drawn on the image), result.json (image size, prompts, predicted
    quality score per mask, file names), low_res_logits.npy and best_low_res.npy (for --mask-input).
    """
    from ..io.atomic import atomic_write, atomic_write_text
    from ..io.models import load_model
    from ..io.viz import cutout_rgba, draw_prompts, overlay_masks, save_png
    from ..predict import SamPredictor
    from ..predict.inputs import check_boxes, check_points, load_image
    from ..predict.semantic_sam_predictor import SemanticSamPredictor, check_level

    if texts or negatives or clip or top != 1:
        if not texts:
            raise ValueError("--negative, --clip and --top go with --text PHRASE")
        if points or box or mask_input is not None or multimask:
            raise ValueError("--text cannot be combined with --point, --box, --mask-input or --multimask")
        from .text_segment import segment_text

        return segment_text(image, checkpoint, texts, negatives, clip, top, out_dir, fast, cutout, device)
    # Everything about the input is checked before the (slow) model load.
    parsed_points = [parse_point(p) for p in points]
    parsed_box = parse_box(box) if box else None
    low_res_in = read_mask_input(mask_input) if mask_input is not None else None
    level = check_level(granularity) if granularity is not None else None
    if not parsed_points and parsed_box is None and low_res_in is None:
        raise ValueError("give at least one prompt: --point X,Y, --box X0,Y0,X1,Y1 or --mask-input FILE.npy")
    rgb = load_image(image)
    size = rgb.shape[:2]
    coords = np.array([p[:2] for p in parsed_points], dtype=np.float64) if parsed_points else None
    labels = np.array([p[2] for p in parsed_points], dtype=np.int64) if parsed_points else None
    check_points(coords, labels, size)
    check_boxes(parsed_box, size)

    model = load_model(checkpoint, mode="fast" if fast else "exact", device=device)
    predictor = SamPredictor(model)
    semantic = isinstance(predictor, SemanticSamPredictor)
    if level is not None and not semantic:
        raise ValueError("--granularity needs a Semantic-SAM checkpoint (e.g. -c semantic-sam-t)")
    predictor.set_image(rgb)
    masks, scores, low_res = predictor.predict(
        point_coords=coords,
        point_labels=labels,
        box=None if parsed_box is None else np.array(parsed_box),
        mask_input=low_res_in,
        multimask_output=multimask,
        **({"granularity": level} if level is not None else {}),
    )
    levels = predictor.last_levels if semantic else None
    order = np.argsort(-scores, kind="stable")  # best first
    masks, scores = masks[order], scores[order]
    has_logits = low_res is not None  # FastSAM selects among its proposals: no low-res logits
    if has_logits:
        low_res = low_res[order]

    out_dir.mkdir(parents=True, exist_ok=True)
    mask_files = []
    for i, mask in enumerate(masks):
        name = f"mask_{i}.png"
        save_png(out_dir / name, mask)
        entry: Dict[str, Any] = {"file": name, "score": float(scores[i]), "area": int(mask.sum())}
        if levels is not None:
            entry["level"] = int(levels[order[i]])
        if cutout:
            entry["cutout"] = f"cutout_{i}.png"
            save_png(out_dir / entry["cutout"], cutout_rgba(rgb, mask))
        mask_files.append(entry)
    # Best mask drawn last so it is on top; the prompts over everything.
    overlay = overlay_masks(rgb, masks[::-1], colors=None)
    overlay = draw_prompts(overlay, coords, labels, parsed_box)
    save_png(out_dir / "overlay.png", overlay)
    if has_logits:
        with atomic_write(out_dir / LOW_RES_FILE) as handle:
            np.save(handle, low_res.astype(np.float32))
        with atomic_write(out_dir / BEST_LOW_RES_FILE) as handle:
            np.save(handle, low_res[:1].astype(np.float32))

    files = [m["file"] for m in mask_files] + [m["cutout"] for m in mask_files if "cutout" in m]
    result = {
        "image": str(image),
        "size": {"width": int(size[1]), "height": int(size[0])},
        "checkpoint": str(checkpoint),
        "mode": "fast" if fast else "exact",
        "prompts": {
            "points": [{"x": x, "y": y, "label": label} for x, y, label in parsed_points],
            "box": parsed_box,
            "mask_input": None if mask_input is None else str(mask_input),
        },
        "multimask": multimask,
        "masks": mask_files,
        "scores": _json_ready(scores.astype(float)),
        "files": files + ["overlay.png"] + ([LOW_RES_FILE, BEST_LOW_RES_FILE] if has_logits else []) + ["result.json"],
    }
    atomic_write_text(out_dir / "result.json", json.dumps(result, indent=2) + "\n")
    if not mask_files:
        click.echo(f"0 masks -> {out_dir} (no proposal matches the prompts)")
        return
    best = mask_files[0]
    click.echo(f"{len(masks)} mask(s) -> {out_dir} (best: {best['file']}, score {best['score']:.3f})")
