"""Record, or compare against, golden outputs of the public prediction paths.

    python3 benchmarks/engine_golden.py record /tmp/engine_golden
    python3 benchmarks/engine_golden.py compare /tmp/engine_golden

For each model (SAM vit_b with seeded random weights, the MobileSAM and HQ-SAM fixture checkpoints in
../shared/fixtures/reference) and mode (exact, fast) it embeds one image and runs one point, 64 points,
a box, a mask prompt and everything mode through the public API (Segmenter, SamAutomaticMaskGenerator).
Run it once as it is and once with SEGANY_NATIVE=0 (the file names say which). `compare` prints the
largest difference of each array against the stored outputs (0 everywhere: bit for bit). The outputs
go to a folder outside the repository; they are never committed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segany import Prompt, SamAutomaticMaskGenerator, Segmenter, load_model  # noqa: E402
from segany.modeling import build_sam  # noqa: E402

SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "reference"
IMAGE = SHARED / "datasets" / "davis345" / "images" / "000.jpg"


def checkpoints(folder: Path) -> Dict[str, Path]:
    vit_b = folder / "vit_b_seed0.pth"
    if not vit_b.exists():
        torch.manual_seed(0)
        torch.save(build_sam("vit_b").state_dict(), vit_b)
    return {
        "vit_b": vit_b,
        "mobile_sam": FIXTURES / "mobile_sam_vit_t.pth",
        "hq_sam": FIXTURES / "sam_hq_vit_small.pth",
    }


def outputs(model_path: Path, mode: str, image: np.ndarray) -> Dict[str, np.ndarray]:
    model = load_model(model_path, mode=mode)
    seg = Segmenter(model)
    emb = seg.embed(image)
    out: Dict[str, np.ndarray] = {"embedding": emb.image_embeddings.float().numpy()}
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)

    def keep(name: str, preds) -> None:
        preds = preds if isinstance(preds, list) else [preds]
        out[f"{name}.logits"] = np.stack([p.masks for p in preds]).astype(np.float32)
        out[f"{name}.scores"] = np.stack([p.scores for p in preds])
        out[f"{name}.low_res"] = np.stack([p.low_res_logits for p in preds])

    one = seg.segment(emb, Prompt(points=[[w * 0.4, h * 0.55]], labels=[1]), return_logits=True)
    keep("one_point", one)
    points = rng.uniform([0, 0], [w, h], size=(64, 2))
    many = seg.segment(emb, [Prompt(points=[p], labels=[1]) for p in points], return_logits=True)
    out["points64.scores"] = np.stack([p.scores for p in many])
    out["points64.low_res"] = np.stack([p.low_res_logits for p in many])
    keep("box", seg.segment(emb, Prompt(box=[w * 0.2, h * 0.2, w * 0.7, h * 0.8]), multimask_output=False, return_logits=True))
    best = one.low_res_logits[int(np.argmax(one.scores))][None]
    keep("mask", seg.segment(emb, Prompt(points=[[w * 0.4, h * 0.55]], labels=[1], mask=best), return_logits=True))
    generator = SamAutomaticMaskGenerator(
        model, points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, output_mode="uncompressed_rle"
    )
    anns = generator.generate(image)
    out["everything.count"] = np.array([len(anns)])
    out["everything.iou"] = np.array([a["predicted_iou"] for a in anns], np.float64)
    out["everything.stability"] = np.array([a["stability_score"] for a in anns], np.float64)
    out["everything.area"] = np.array([a["area"] for a in anns], np.int64)
    out["everything.bbox"] = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
    out["everything.counts_sum"] = np.array([int(np.sum(np.arange(len(a["segmentation"]["counts"])) * np.asarray(a["segmentation"]["counts"]))) for a in anns], np.int64)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--models", nargs="*", default=["vit_b", "mobile_sam", "hq_sam"])
    parser.add_argument("--modes", nargs="*", default=["exact", "fast"])
    args = parser.parse_args()
    if not IMAGE.exists():
        print(f"needs {IMAGE} (../shared)", file=sys.stderr)
        return 2
    from PIL import Image

    image = np.array(Image.open(IMAGE).convert("RGB"))
    args.folder.mkdir(parents=True, exist_ok=True)
    native = "native0" if os.environ.get("SEGANY_NATIVE", "1") == "0" else "native1"
    paths = checkpoints(args.folder)
    worst = 0.0
    for name in args.models:
        for mode in args.modes:
            torch.manual_seed(0)
            got = outputs(paths[name], mode, image)
            file = args.folder / f"{name}__{mode}__{native}.npz"
            if args.action == "record":
                np.savez_compressed(file, **got)
                print(f"recorded {file}")
                continue
            stored = dict(np.load(file))
            for key in sorted(set(stored) | set(got)):
                if key not in stored or key not in got or stored[key].shape != got[key].shape:
                    print(f"{file.name} {key}: MISSING or shape differs")
                    worst = float("inf")
                    continue
                diff = float(np.max(np.abs(stored[key].astype(np.float64) - got[key].astype(np.float64)), initial=0.0))
                worst = max(worst, diff)
                print(f"{file.name} {key}: max |diff| {diff:.3g}")
    if args.action == "compare":
        print(f"largest difference: {worst:.3g}")
        return 0 if worst == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
