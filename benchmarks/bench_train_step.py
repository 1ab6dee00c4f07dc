"""CPU time of one fine-tuning step of the mask decoder, for two segany trees (or one) side by side.

    python3 benchmarks/bench_train_step.py --before /path/to/old/checkout --after . --threads 1 --rounds 3

The step: SAM vit_b's prompt encoder and mask decoder (seeded random weights), one random (1, 256,
64, 64) image embedding, 8 one-point prompts, multimask decode, forward + backward of a loss over the
logits and IoU predictions (as bench_pair.py's train_step row, without the encoder). Each tree runs
it through the plain modules (`plain`) and, where it has one, the engine's training twin (`twin`,
segany.engine.training_twin, what segany.train runs). Each process pins torch to --threads and
reports the median CPU time (time.process_time) of --steps steps after a warm-up; processes
alternate between the trees for --rounds rounds, and the medians over rounds are printed. CPU time,
not wall time: on a shared machine it is what other processes disturb least.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
tree, variant, threads, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(threads)
import segany
assert segany.__file__.startswith(tree), segany.__file__
from segany.modeling import build_sam
torch.manual_seed(0)
model = build_sam("vit_b")
net = model
if variant == "twin":
    try:
        from segany.engine import training_twin
    except ImportError:
        print(json.dumps(None)); sys.exit(0)
    net = training_twin(model)
for name, p in model.named_parameters():
    p.requires_grad_(not name.startswith("image_encoder."))
g = torch.Generator().manual_seed(0)
features = {"image_embeddings": torch.randn(1, 256, 64, 64, generator=g)}
points = (torch.rand(8, 1, 2, generator=g) * 1024, torch.ones(8, 1, dtype=torch.int))
def step():
    low, iou = net.decode(features, points, None, None, True)
    (low.square().mean() + iou.sum()).backward()
    model.zero_grad(set_to_none=True)
step()
cpu = []
for _ in range(steps):
    start = time.process_time(); step(); cpu.append(time.process_time() - start)
print(json.dumps(statistics.median(cpu) * 1e3))
""".replace("import json, sys, time", "import json, statistics, sys, time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another segany checkout (optional)")
    parser.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    trees = {"after": args.after.resolve()}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    samples = {(side, variant): [] for side in trees for variant in ("plain", "twin")}
    for _ in range(args.rounds):
        for (side, variant), values in samples.items():
            run = subprocess.run(
                [sys.executable, "-c", CHILD, str(trees[side]), variant, str(args.threads), str(args.steps)],
                capture_output=True, text=True, cwd=str(trees[side]),
            )
            if run.returncode:
                print(run.stderr[-2000:], file=sys.stderr)
                return 1
            value = json.loads(run.stdout.strip().splitlines()[-1])
            if value is not None:
                values.append(value)
    print(f"| tree | path | CPU ms per step (median of {args.rounds} rounds) | range |")
    print("|---|---|---|---|")
    for (side, variant), values in samples.items():
        if values:
            print(f"| {side} | {variant} | {statistics.median(values):.0f} | {min(values):.0f}-{max(values):.0f} |")
        else:
            print(f"| {side} | {variant} | (no training twin in this tree) | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
