"""Wall time of `segany everything` in-process against `--ray` (1 and 2 actors) over the same images.

Each run is the whole command in a fresh process, as a user runs it: Python start, model loading, and
for --ray the start of a local Ray and its actors. Every command starts in a session of its own: with the kernel's autogroup
scheduling a session gets one fair share of a busy machine, and Ray starts its processes in sessions
of their own, so an in-process run left in the benchmark's session would be handicapped on a shared
machine. Prints a markdown table. `-c random-vit_b` writes a vit_b checkpoint with random weights (the
released shapes; no pretrained weights are needed to time it).

    python3 benchmarks/bench_scale.py -c ../shared/fixtures/reference/sam_vit_small.pth -n 20
    python3 benchmarks/bench_scale.py -c random-vit_b --fast -n 6
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--checkpoint", required=True)
    parser.add_argument("-n", "--images", type=int, default=20)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--points-per-side", type=int, default=2)
    parser.add_argument("--runs", default="in-process,ray-1x2,ray-2x1",
                        help="in-process, ray-AxC (A actors of C CPUs each)")
    args = parser.parse_args()
    images = sorted((DATASETS / "grabcut" / "images").glob("*"))[: args.images]
    if len(images) < args.images:
        sys.exit(f"need {args.images} images under {DATASETS / 'grabcut' / 'images'}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, "in")
        folder.mkdir()
        for path in images:
            shutil.copy(path, folder / path.name)
        if args.checkpoint == "random-vit_b":
            import torch

            sys.path.insert(0, str(ROOT))
            from segany.io.checkpoint import save_checkpoint
            from segany.modeling import build_sam

            torch.manual_seed(0)
            args.checkpoint = str(Path(tmp, "random_vit_b.pth"))
            save_checkpoint(build_sam("vit_b").eval(), args.checkpoint)
        for index, run in enumerate(args.runs.split(",")):
            out = Path(tmp, f"{index}-{run}")
            cmd = [sys.executable, "-m", "segany.cli.main", "everything", str(folder), "-c", args.checkpoint,
                   "--out", str(out), "--points-per-side", str(args.points_per_side)] + (["--fast"] if args.fast else [])
            if run.startswith("ray"):
                actors, cpus = run.split("-")[1].split("x")
                cmd += ["--batch-size", "1", "--actors", actors, "--cpus-per-actor", cpus, "--ray"]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
            wall = time.perf_counter() - start
            rows.append((run, wall))
            print(f"{run}: {wall:.1f} s", flush=True)
    base = rows[0][1]
    print(f"\n{args.images} images, {Path(args.checkpoint).name}{' --fast' if args.fast else ''}, "
          f"--points-per-side {args.points_per_side}\n")
    print("| run | wall (s) | images/s | vs first |\n|---|---|---|---|")
    for run, wall in rows:
        print(f"| {run} | {wall:.1f} | {args.images / wall:.3f} | {wall / base:.2f}x |")


if __name__ == "__main__":
    main()
