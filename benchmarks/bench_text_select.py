"""Speed of text selection: CLIP ViT-B/32 (random weights, released shapes) over N candidate masks.

    python3 benchmarks/bench_text_select.py                 # 100 masks, fast and exact, 3 reps
    python3 benchmarks/bench_text_select.py --masks 100 --modes fast --reps 5

The image is DAVIS frame 000 (854x480, ../shared; a synthetic one when absent). The candidates are
N random ellipses (areas from 0.1% to 30% of the image, like everything mode's masks). A sample is one
select_by_text call: the N blanked crops (box cut, blanking, bicubic resize, centre crop, normalisation),
the N image embeddings in batches of 32, the text embedding and the ranking; the crops alone and the
image tower alone are timed separately. Each figure is the median of --reps samples after one warm-up.
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
sys.path.insert(0, str(ROOT))  # this checkout's segany, not an installed one
IMAGE = ROOT.parent / "shared" / "datasets" / "davis345" / "images" / "000.jpg"


def load_image() -> np.ndarray:
    from PIL import Image

    if IMAGE.is_file():
        return np.array(Image.open(IMAGE).convert("RGB"))
    return np.random.default_rng(0).integers(0, 256, (480, 854, 3), dtype=np.uint8)


def ellipses(h: int, w: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        area = h * w * 10 ** rng.uniform(-3, np.log10(0.3))
        ratio = rng.uniform(0.4, 2.5)
        a, b = np.sqrt(area / np.pi * ratio), np.sqrt(area / np.pi / ratio)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        masks[i] = ((yy - cy) / b) ** 2 + ((xx - cx) / a) ** 2 <= 1
        if not masks[i].any():
            masks[i, int(cy) % h, int(cx) % w] = True
    return masks


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default="fast,exact")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    from segany.engine.clip import encode_images, make_fast
    from segany.modeling.clip import CLIP, CLIP_CONFIGS
    from segany.predict.text_select import ClipScorer, mask_crops, select_by_text

    image = load_image()
    masks = ellipses(*image.shape[:2], args.masks)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"image {image.shape[1]}x{image.shape[0]}, {args.masks} masks")
    # The machine's load, measured in the same run: bfloat16 GEMM throughput at the MLP's shape.
    a, b = torch.randn(3200, 768).bfloat16(), torch.randn(768, 3072).bfloat16()
    gemm_s = median_time(lambda: a @ b, 5)
    gflops = 2 * 3200 * 768 * 3072 / gemm_s / 1e9
    print(f"bfloat16 GEMM now: {gflops:.0f} GFLOP/s; the image tower's {args.masks} crops need "
          f"{8.8 * args.masks:.0f} GFLOP (4.4 G multiply-adds each), so >= {8.8 * args.masks / gflops:.1f} s at this rate")
    crops_s = median_time(lambda: mask_crops(image, masks, 224), args.reps)
    print(f"crops only: {crops_s:.3f} s")
    pixels = mask_crops(image, masks, 224)
    for mode in args.modes.split(","):
        torch.manual_seed(0)
        model = CLIP(CLIP_CONFIGS["ViT-B-32"]).eval()
        if mode == "fast":
            make_fast(model)
        scorer = ClipScorer(model, batch_size=args.batch)
        tower_s = median_time(lambda: encode_images(model, pixels, args.batch), args.reps)
        total_s = median_time(lambda: select_by_text(image, masks, "a dog", scorer, top_k=5), args.reps)
        print(f"{mode}: image tower {tower_s:.3f} s, select_by_text total {total_s:.3f} s "
              f"({1000 * total_s / args.masks:.1f} ms per mask)")


if __name__ == "__main__":
    main()
