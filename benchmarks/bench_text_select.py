"""Speed of text selection: CLIP ViT-B/32 (random weights, released shapes) over N candidate masks.

    python3 benchmarks/bench_text_select.py                       # 100 masks, fast and exact, 3 reps
    python3 benchmarks/bench_text_select.py --modes fast --reps 5 # the issue's figure (target < 1.5 s)

The image is DAVIS frame 000 (854x480, ../shared; a synthetic one when absent). The candidates are
N random ellipses (areas from 0.1% to 30% of the image, like everything mode's masks). A sample is one
select_by_text call: the N blanked crops (box cut, blanking, bicubic resize, centre crop), the N image
embeddings in batches of --batch, the text embedding and the ranking. The crops alone and the image
tower alone are timed too, and, for comparison, the released tower's forward in bfloat16 (what fast
mode ran before the engine's tower). Each figure: wall-clock and CPU-time medians of --reps samples
after one warm-up, at PyTorch's thread count (--threads to pin it). The machine's bfloat16 matrix
rate is measured in the same run, and the load average printed, so a loaded machine shows.
Fast mode's agreement with float32 (embedding cosine, the best mask per phrase) is printed at the end.
"""
from __future__ import annotations

import argparse
import copy
import os
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
PHRASES = ["a dog", "a person riding a bicycle", "the sky", "a red car"]


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


def timed(fn, reps: int):
    """(wall median, CPU median) in seconds over reps samples after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def show(label: str, t) -> None:
    print(f"  {label:<44} {t[0]:7.3f} s wall   {t[1]:7.3f} s CPU", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default="fast,exact")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the released forward in bfloat16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from segany.engine.clip import encode_crops, make_fast, normalize_crops
    from segany.modeling.clip import CLIP, CLIP_CONFIGS
    from segany.predict.text_select import ClipScorer, crop_masks, score_masks, select_by_text

    image = load_image()
    masks = ellipses(*image.shape[:2], args.masks)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; image {image.shape[1]}x{image.shape[0]}, {args.masks} masks; "
          f"load average {os.getloadavg()[0]:.1f}")
    a, b = torch.randn(3200, 768).bfloat16(), torch.randn(768, 3072).bfloat16()
    gemm_s, _ = timed(lambda: a @ b, 5)
    gflops = 2 * 3200 * 768 * 3072 / gemm_s / 1e9
    need = 2 * args.masks * 4.3  # G multiply-adds per crop with the class-token-only last block
    print(f"bfloat16 GEMM now: {gflops:.0f} GFLOP/s; the image tower's {args.masks} crops need ~{need:.0f} GFLOP, "
          f"so >= {need / gflops:.2f} s of products at this rate")
    show("crops only (uint8)", timed(lambda: crop_masks(image, masks, 224), args.reps))
    crops = crop_masks(image, masks, 224)

    torch.manual_seed(0)
    exact = CLIP(CLIP_CONFIGS["ViT-B-32"]).eval()
    models = {}
    for mode in args.modes.split(","):
        model = make_fast(copy.deepcopy(exact)) if mode == "fast" else exact
        models[mode] = model
        scorer = ClipScorer(model, batch_size=args.batch)
        print(f"{mode}:")
        if mode == "fast" and not args.no_baseline:
            pixels = normalize_crops(crops).bfloat16()

            def released_forward():
                with torch.inference_mode():
                    for i in range(0, len(pixels), args.batch):
                        model.encode_image(pixels[i : i + args.batch])

            show("image tower, released forward in bfloat16", timed(released_forward, args.reps))
        show("image tower (engine)", timed(lambda: encode_crops(model, crops, args.batch), args.reps))
        total = timed(lambda: select_by_text(image, masks, "a dog", scorer, top_k=5), args.reps)
        show("select_by_text total", total)
        print(f"  ({1000 * total[0] / args.masks:.1f} ms per mask wall)")
    if {"fast", "exact"} <= set(models):
        e, f = encode_crops(models["exact"], crops), encode_crops(models["fast"], crops)
        cos = (e * f).sum(-1)
        se, _ = score_masks(image, masks, PHRASES, ClipScorer(models["exact"]))
        sf, _ = score_masks(image, masks, PHRASES, ClipScorer(models["fast"]))
        same = sum(int(np.argmax(se[p]) == np.argmax(sf[p])) for p in range(len(PHRASES)))
        print(f"fast vs exact: embedding cosine min {cos.min():.5f} (median {cos.median():.5f}); "
              f"max |score difference| {np.abs(se - sf).max():.4f}; same best mask for {same}/{len(PHRASES)} phrases")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
