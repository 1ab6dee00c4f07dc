"""Everything mode: the released SamAutomaticMaskGenerator vs segany's, same random weights, same image.

    python benchmarks/bench_amg.py                          # vit_b, 32x32 grid, crops 0 then 1
    python benchmarks/bench_amg.py --model vit_b --points-per-side 8 --crop-layers 0   # quick

Both generators get the same seeded random weights (the reference model's state dict is loaded into
segany's) and the released default settings unless --permissive lowers the thresholds (random weights
predict low IoUs, so with the released thresholds few or no masks survive and almost nothing is upscaled:
a best case; with --permissive every output passes the IoU filter and is upscaled: the worst case). Prints a markdown table:
time of each, ratio, mask counts and how well the masks agree (each segany mask's best IoU with a
reference mask). The reference runs through ../shared/tools/refshim (no torchvision).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def load_reference():
    shim = SHARED / "tools" / "refshim"
    if not shim.is_dir():
        raise SystemExit("../shared/tools/refshim is absent: the reference generator cannot be imported")
    sys.path.insert(0, str(shim))
    import segment_anything

    return segment_anything


def default_image() -> Path:
    return SHARED / "datasets" / "davis345" / "images" / "000.jpg"


def agreement(ours, ref) -> str:
    """Mean and min over segany's masks of the best IoU with a reference mask (pycocotools on RLEs)."""
    from pycocotools import mask as mask_utils

    from segany.io import rle as rle_io

    if not ours or not ref:
        return "n/a (no masks)" if not ours and not ref else "0 (one side empty)"

    def coco(anns):
        out = []
        for a in anns:
            seg = a["segmentation"]
            c = rle_io.compress(seg if isinstance(seg, dict) else rle_io.encode(seg)[0])
            out.append(dict(c, counts=c["counts"].encode()))
        return out

    iou = np.asarray(mask_utils.iou(coco(ours), coco(ref), [0] * len(ref))).reshape(len(ours), len(ref))
    best = iou.max(1)
    return f"mean {best.mean():.4f}, min {best.min():.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--image", type=Path, default=default_image())
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--crop-layers", default="0,1", help="comma-separated crop_n_layers values to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="exact", help='segany model mode (load_model mode, e.g. "exact" or "fast")')
    ap.add_argument("--permissive", action="store_true", help="lowered thresholds so random-weight masks survive")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ref_pkg = load_reference()
    import segany
    from segany.predict.inputs import load_image

    image = load_image(args.image)
    torch.manual_seed(args.seed)
    ref_model = ref_pkg.sam_model_registry[args.model](checkpoint=None).eval()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # the user's path: a checkpoint file through load_model
        ckpt = Path(tmp) / f"random_{args.model}.pth"
        torch.save(ref_model.state_dict(), ckpt)
        ours_model = segany.load_model(ckpt, mode=args.mode)

    settings = dict(points_per_side=args.points_per_side)
    if args.permissive:
        settings.update(pred_iou_thresh=0.0, stability_score_thresh=0.5, stability_score_offset=0.05)
    rows = []
    for layers in [int(x) for x in args.crop_layers.split(",")]:
        cfg = dict(settings, crop_n_layers=layers)
        t = time.perf_counter()
        try:
            ref = ref_pkg.SamAutomaticMaskGenerator(ref_model, output_mode="uncompressed_rle", **cfg).generate(image)
            ref_error = None
        except Exception as err:  # the released generator fails on an empty result with crops (box_area)
            ref, ref_error = None, f"{type(err).__name__}: {err}"
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        ours = segany.SamAutomaticMaskGenerator(ours_model, output_mode="uncompressed_rle", **cfg).generate(image)
        t_ours = time.perf_counter() - t
        if ref_error is not None:
            rows.append((layers, None, t_ours, f"failed after {t_ref:.1f} s ({ref_error})", len(ours), "n/a"))
            print(f"crop_n_layers={layers}: reference failed after {t_ref:.1f} s ({ref_error}); "
                  f"segany {t_ours:.1f} s ({len(ours)} masks); try --permissive", flush=True)
            continue
        rows.append((layers, t_ref, t_ours, len(ref), len(ours), agreement(ours, ref)))
        print(f"crop_n_layers={layers}: reference {t_ref:.1f} s ({len(ref)} masks), segany {t_ours:.1f} s ({len(ours)} masks)",
              flush=True)

    h, w = image.shape[:2]
    print()
    print(f"model {args.model} (random weights, seed {args.seed}), image {args.image.name} {w}x{h}, "
          f"{args.points_per_side}x{args.points_per_side} grid, {'permissive' if args.permissive else 'released'} "
          f"thresholds, segany mode {args.mode}, torch threads {torch.get_num_threads()}")
    print("permissive: every output passes the IoU filter and is upscaled to full size (the worst case); "
          if args.permissive else
          "released thresholds: random weights' outputs do not pass them, so few or no masks are upscaled "
          "(a best case that real weights do not reach; --permissive for the every-output-upscaled row)")
    print()
    print("| crop_n_layers | reference (s) | segany (s) | speed-up | masks ref | masks segany | mask agreement (best IoU) |")
    print("|---|---|---|---|---|---|---|")
    for layers, t_ref, t_ours, n_ref, n_ours, agree in rows:
        if t_ref is None:  # the reference failed: no time, no ratio
            print(f"| {layers} | {n_ref} | {t_ours:.1f} | n/a | - | {n_ours} | {agree} |")
        else:
            print(f"| {layers} | {t_ref:.1f} | {t_ours:.1f} | {t_ref / t_ours:.2f}x | {n_ref} | {n_ours} | {agree} |")


if __name__ == "__main__":
    main()
