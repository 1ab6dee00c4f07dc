"""Speed of Semantic-SAM on this CPU: image features (resize, normalise, Swin backbone, pixel decoder and
the decoder's per-image values) and one click (six levels, masks at the image's size).

    python benchmarks/bench_semantic_sam.py                       # mini fixture model and released Swin-T
    python benchmarks/bench_semantic_sam.py --configs mini --reps 2 --threads 1

Weights: the mini fixture checkpoint (../shared/fixtures/semantic_sam) and, for Swin-T, seeded random
weights in the released configuration (speed does not depend on the values). Image: DAVIS 000.jpg
(854x480 -> model frame 1138x640). Each figure is the median of --reps samples; a click sample is the
mean of 10 consecutive clicks at different places. `click, plain decode` is the model's own decode
(no per-image values), for comparison with the engine's path that the predictor uses.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGE = SHARED / "datasets" / "davis345" / "images" / "000.jpg"
MINI = SHARED / "fixtures" / "semantic_sam" / "semantic_sam_mini_seed0.pth"
sys.path.insert(0, str(ROOT))  # this checkout's segany


def build(name: str):
    import segany
    from segany.modeling.semantic_sam import SemanticSam, swin_t_config

    if name == "mini":
        return segany.load_model(MINI)
    torch.manual_seed(0)
    model = SemanticSam(swin_t_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="mini,swin-t")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import segany
    from segany.predict.inputs import load_image

    image = load_image(IMAGE)
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    clicks = rng.uniform([0, 0], [w, h], size=(10, 2))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| config | image features | click (engine, predictor) | click, plain decode |")
    print("|---|---|---|---|")
    for name in args.configs.split(","):
        model = build(name)
        predictor = segany.SamPredictor(model)
        feats, click, plain = [], [], []
        for _ in range(args.reps):
            t = time.perf_counter()
            predictor.set_image(image)
            feats.append(time.perf_counter() - t)
            t = time.perf_counter()
            for x, y in clicks:
                predictor.predict(point_coords=[[x, y]])
            click.append((time.perf_counter() - t) / len(clicks))
            t = time.perf_counter()
            with torch.no_grad():
                for x, y in clicks:
                    model.decode(predictor.image.features, torch.tensor([[x / w, y / h]], dtype=torch.float64))
            plain.append((time.perf_counter() - t) / len(clicks))
        med = statistics.median
        print(f"| {name} | {med(feats):.2f} s | {med(click) * 1e3:.0f} ms | {med(plain) * 1e3:.0f} ms (decoder only) |")


if __name__ == "__main__":
    main()
