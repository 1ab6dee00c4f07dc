"""Paired timing of two segany trees (e.g. before/after a refactor) on the same machine and settings.

    python3 benchmarks/bench_pair.py --before /path/to/old/checkout --after . --models vit_b,vit_t --rounds 3

Each round runs one process per tree, alternating (before, after, before, ...), so that the machine's
drift hits both alike. A process loads seeded random weights (the same file for both trees) with
`segany.load_model(mode=...)` and times, on one 854x480 DAVIS frame: set_image (encoder), one
one-point predict (click, mean of 10), 64 one-point prompts through predict_torch (per prompt) and
everything mode (SamAutomaticMaskGenerator, `--points-per-side`, released thresholds otherwise);
in exact mode also a fine-tuning step of the mask decoder (Sam.decode with autograd, 8 one-point
prompts, forward + backward; median of 3 after a warm-up), through the training twin
(segany.engine.training_twin, what segany.train runs) where the tree has one, else the model.
Prints per row the median over rounds of each tree and their ratio. The reference implementation is
not timed here (see bench_speed.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from PIL import Image
torch.set_num_threads(int(sys.argv[6]))
import segany
assert segany.__file__.startswith(sys.argv[1]), segany.__file__
weights, mode, image_path, pps = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
image = np.array(Image.open(image_path).convert("RGB"))
model = segany.load_model(weights, mode=mode)
predictor = segany.SamPredictor(model)
out = {}
predictor.set_image(image)  # warm-up (the compiled kernels load on first use)
t = time.perf_counter(); predictor.set_image(image); out["encoder_s"] = time.perf_counter() - t
point = np.array([[400.0, 260.0]]); label = np.array([1])
predictor.predict(point_coords=point, point_labels=label)
t = time.perf_counter()
for _ in range(10):
    predictor.predict(point_coords=point, point_labels=label)
out["click_ms"] = (time.perf_counter() - t) / 10 * 1e3
rng = np.random.default_rng(0)
coords = torch.as_tensor(predictor.transform.apply_coords(rng.uniform([0, 0], [854, 480], (64, 1, 2)), image.shape[:2]), dtype=torch.float)
labels = torch.ones(64, 1, dtype=torch.int)
t = time.perf_counter(); predictor.predict_torch(coords, labels); out["prompt64_ms"] = (time.perf_counter() - t) / 64 * 1e3
if pps > 0:
    generator = segany.SamAutomaticMaskGenerator(model, points_per_side=pps)
    t = time.perf_counter(); masks = generator.generate(image); out["everything_s"] = time.perf_counter() - t
    out["everything_masks"] = len(masks)
if mode == "exact":  # a fine-tuning step of the mask decoder: 8 one-point prompts, forward + backward
    try:  # what segany.train runs: the engine's training twin where the tree has one
        from segany.engine import training_twin
        net = training_twin(model)
    except ImportError:
        net = model
    features = {"image_embeddings": predictor.features.detach()}
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mask_decoder."))
    points = (torch.rand(8, 1, 2, generator=torch.Generator().manual_seed(0)) * 1024, torch.ones(8, 1, dtype=torch.int))
    times = []
    for _ in range(4):
        t = time.perf_counter()
        low, iou = net.decode(features, points, None, None, True)
        (low.square().mean() + iou.sum()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    out["train_step_ms"] = sorted(times[1:])[1] * 1e3
print(json.dumps(out))
"""

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT.parent / "shared" / "datasets" / "davis345" / "images" / "000.jpg"


def weights_for(name: str, folder: Path) -> Path:
    path = folder / f"{name}_seed0.pth"
    if not path.exists():
        sys.path.insert(0, str(ROOT))
        import torch

        from segany.modeling import build_sam
        from segany.modeling.tiny_vit import mobile_sam_config

        torch.manual_seed(0)
        model = build_sam(mobile_sam_config() if name == "vit_t" else name)
        torch.save(model.state_dict(), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=ROOT)
    parser.add_argument("--models", default="vit_b,vit_t")
    parser.add_argument("--modes", default="fast,exact")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--points-per-side", type=int, default=16, help="everything mode's grid (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "segany_bench_pair")
    args = parser.parse_args()
    args.weights.mkdir(parents=True, exist_ok=True)
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for name in args.models.split(","):
        weights = weights_for(name, args.weights)
        for mode in args.modes.split(","):
            samples = {side: [] for side in trees}
            for _ in range(args.rounds):
                for side, tree in trees.items():
                    run = subprocess.run(
                        [sys.executable, "-c", CHILD, str(tree), str(weights), mode, str(IMAGE), str(args.points_per_side), str(args.threads)],
                        capture_output=True, text=True, env=env, cwd=str(tree),
                    )
                    if run.returncode:
                        print(run.stderr[-2000:], file=sys.stderr)
                        return 1
                    samples[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
            for row in samples["before"][0]:
                before = statistics.median(s[row] for s in samples["before"])
                after = statistics.median(s[row] for s in samples["after"])
                spread = {side: (min(s[row] for s in samples[side]), max(s[row] for s in samples[side])) for side in trees}
                print(
                    f"| {name} | {mode} | {row} | {before:.4g} | {after:.4g} | {after / before if before else float('nan'):.3f} | "
                    f"{spread['before'][0]:.4g}-{spread['before'][1]:.4g} / {spread['after'][0]:.4g}-{spread['after'][1]:.4g} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
