"""`segany segment --text`: the candidate masks that CLIP matches best to a phrase.

The candidates are everything mode's masks (SAM, MobileSAM, HQ-SAM) or, with a FastSAM checkpoint
(-c fastsam-s), FastSAM's instances from one network pass."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import click
import numpy as np

DEFAULT_CLIP = "clip_vit_b32"


def segment_text(
    image: Path, checkpoint: str, texts: Sequence[str], negatives: Sequence[str], clip: Optional[str],
    top: int, out_dir: Path, fast: bool, cutout: bool, device: str,
) -> None:
    from ..io.atomic import atomic_write_text
    from ..io.clip import load_clip
    from ..io.models import load_model
    from ..io.zoo import DownloadError
    from ..io.viz import cutout_rgba, overlay_masks, save_png
    from ..predict.inputs import load_image
    from ..predict.text_select import check_phrases, select_by_text

    # Everything about the input is checked before the (slow) model loads.
    phrases = check_phrases(list(texts), "--text")
    negative = check_phrases(list(negatives), "--negative") if negatives else None
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    rgb = load_image(image)
    from ..text import tokenize

    tokenize(phrases)  # the tokenizer's dependencies and vocabulary, before any download
    mode = "fast" if fast else "exact"
    try:
        clip_model = load_clip(clip or DEFAULT_CLIP, mode=mode, device=device)
    except DownloadError as exc:  # its advice names --checkpoint; here the file goes to --clip
        raise ValueError(str(exc).replace("--checkpoint", "--clip")) from None
    model = load_model(checkpoint, mode=mode, device=device)
    records = candidate_generator(model).generate_records(rgb)
    candidates = records.masks() if len(records) else np.zeros((0, *rgb.shape[:2]), bool)
    matches = select_by_text(rgb, candidates, phrases, clip_model, top_k=top, negative=negative)

    out_dir.mkdir(parents=True, exist_ok=True)
    entries: List[Dict[str, Any]] = []
    for i, match in enumerate(matches):
        mask = candidates[match.index]
        ys, xs = np.nonzero(mask)
        entry: Dict[str, Any] = {
            "file": f"mask_{i}.png", "phrase": match.phrase, "score": match.score, "similarity": match.similarity,
            "candidate": match.index, "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
        }
        save_png(out_dir / entry["file"], mask)
        if cutout:
            entry["cutout"] = f"cutout_{i}.png"
            save_png(out_dir / entry["cutout"], cutout_rgba(rgb, mask))
        entries.append(entry)
    best: Dict[str, np.ndarray] = {}
    for match in matches:  # the best mask of each phrase, drawn on the image
        best.setdefault(match.phrase, candidates[match.index])
    shown = np.stack(list(best.values())[::-1]) if best else np.zeros((0, *rgb.shape[:2]), bool)
    overlay = overlay_masks(rgb, shown, colors=None)
    save_png(out_dir / "overlay.png", overlay)
    result = {
        "image": str(image),
        "size": {"width": int(rgb.shape[1]), "height": int(rgb.shape[0])},
        "checkpoint": str(checkpoint),
        "clip": str(clip or DEFAULT_CLIP),
        "mode": mode,
        "prompts": {"text": phrases, "negative": negative or [], "top": top},
        "candidates": int(len(candidates)),
        "masks": entries,
        "scores": [e["score"] for e in entries],
        "files": [e["file"] for e in entries] + [e["cutout"] for e in entries if "cutout" in e] + ["overlay.png", "result.json"],
    }
    atomic_write_text(out_dir / "result.json", json.dumps(result, indent=2) + "\n")
    if not entries:
        click.echo(f"no candidate masks in {image}: nothing matched -> {out_dir}")
        return
    click.echo(f"{len(entries)} mask(s) of {len(candidates)} candidates -> {out_dir} "
               f"(best for {entries[0]['phrase']!r}: {entries[0]['file']}, score {entries[0]['score']:.3f})")


def candidate_generator(model: Any) -> Any:
    """What proposes the candidate masks: FastSAM's instances for a FastSAM model, else everything mode."""
    from ..modeling.yolov8_seg import YoloV8Seg

    if isinstance(model, YoloV8Seg):
        from ..predict.fastsam import FastSam

        return FastSam(model)
    from ..predict.amg import MaskGenerator

    return MaskGenerator(model)
