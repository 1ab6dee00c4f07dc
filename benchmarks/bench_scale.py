"""Wall time of `segany everything` in-process against `--ray` (1 and 2 actors) over the same images.

Each run is the whole command in a fresh process, as a user runs it: Python start, model loading, and
for --ray the start of a local Ray and its actors. Every command starts in a session of its own: with the kernel's autogroup
scheduling a session gets one fair share of a busy machine, and Ray starts its processes in sessions
of their own, so an in-process run left in the benchmark's session would be handicapped on a shared
machine. Prints markdown tables: each run's wall time split by its outputs' timestamps (start-up to the
first image's file, the images, the exit), the medians over `--repeat` rounds, and segany.batch's own
breakdown of the --ray runs (summary.json's "timings": Ray's start, the actors' start and model loading,
the images, the shutdown), and the CPU seconds of each command and every process it started, by
process (the driver, the model's actor, Ray Data's actors, Ray's daemons): on a loaded machine these
say more than wall times. `-c random-vit_b` writes a vit_b checkpoint with random weights (the
released shapes; no pretrained weights are needed to time it).

    python3 benchmarks/bench_scale.py -c ../shared/fixtures/reference/sam_vit_small.pth -n 20
    python3 benchmarks/bench_scale.py -c random-vit_b --fast -n 20 --runs in-process,ray-1x2 --repeat 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cpu_tree

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
    parser.add_argument("--repeat", type=int, default=1, help="run the whole list this many times (medians)")
    args = parser.parse_args()
    images = sorted((DATASETS / "grabcut" / "images").glob("*"))[: args.images]
    if len(images) < args.images:
        sys.exit(f"need {args.images} images under {DATASETS / 'grabcut' / 'images'}")
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    rows: list = []
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
        runs = args.runs.split(",") * args.repeat
        for index, run in enumerate(runs):
            out = Path(tmp, f"{index}-{run}")
            cmd = [sys.executable, "-m", "segany.cli.main", "everything", str(folder), "-c", args.checkpoint,
                   "--out", str(out), "--points-per-side", str(args.points_per_side)] + (["--fast"] if args.fast else [])
            if run.startswith("ray"):
                actors, cpus = run.split("-")[1].split("x")
                cmd += ["--batch-size", "1", "--actors", actors, "--cpus-per-actor", cpus, "--ray"]
            load = os.getloadavg()[0]
            start = time.time()
            wall, cpu, code = cpu_tree.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True)
            end = start + wall
            if code != 0:
                sys.exit(f"{' '.join(cmd)} exited with {code}")
            rows.append(breakdown(run, out, start, end, load))
            rows[-1]["cpu"] = cpu
            print(f"{run}: {wall:.1f} s (load {load:.1f}) {rows[-1]['parts']}; CPU {sum(cpu.values()):.1f} s "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])), flush=True)
    report(rows, args)


def breakdown(run: str, out: Path, start: float, end: float, load: float) -> dict:
    """Wall time split by the outputs' modification times, plus the run's own timings (segany.batch runs).

    start-up: command start to the first image's JSON (Python, imports, for --ray Ray's and the actors'
    start, model loading, one image); images: first JSON to the last; exit: last JSON to the command's
    end (summary, Ray's shutdown, the interpreter's exit)."""
    written = sorted(p.stat().st_mtime for p in out.glob("*.json") if p.name != "segany-run.json")
    parts = {"start-up": written[0] - start, "images": written[-1] - written[0], "exit": end - written[-1]}
    summary = out / "_segany" / "summary.json"
    timings = json.loads(summary.read_text()).get("timings", {}) if summary.exists() else {}
    return {"run": run, "wall": end - start, "load": load, "images": len(written),
            "parts": {k: round(v, 2) for k, v in parts.items()}, "timings": timings}


def report(rows: list, args) -> None:
    name = Path(args.checkpoint).name + (" --fast" if args.fast else "")
    print(f"\n{args.images} images, {name}, --points-per-side {args.points_per_side}; "
          f"{os.cpu_count()} CPUs, load average per run in brackets\n")
    print("| run | wall (s) | start-up | images | exit | images/s | load |\n|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["parts"]
        print(f"| {r['run']} | {r['wall']:.1f} | {p['start-up']:.1f} | {p['images']:.1f} | {p['exit']:.1f} | "
              f"{r['images'] / r['wall']:.3f} | {r['load']:.1f} |")
    kinds = list(dict.fromkeys(r["run"] for r in rows))
    medians = {k: statistics.median(r["wall"] for r in rows if r["run"] == k) for k in kinds}
    base = medians[kinds[0]]
    print("\n| run | median wall (s) | vs " + kinds[0] + " |\n|---|---|---|")
    for kind in kinds:
        print(f"| {kind} | {medians[kind]:.1f} | {medians[kind] / base:.2f}x |")
    groups = list(dict.fromkeys(k for r in rows for k in sorted(r["cpu"], key=lambda g: -r["cpu"][g])))
    print("\nCPU seconds of each command and every process it started (benchmarks/cpu_tree.py), by process")
    print("| run | all | " + " | ".join(groups) + " |\n|---|---|" + "---|" * len(groups))
    for r in rows:
        print(f"| {r['run']} | {sum(r['cpu'].values()):.1f} | " + " | ".join(f"{r['cpu'].get(g, 0):.1f}" for g in groups)
              + " |")
    timed = [r for r in rows if r["timings"]]
    if timed:
        keys = list(dict.fromkeys(k for r in timed for k in r["timings"]))
        print("\nsegany.batch's own timings (s; summary.json): " + ", ".join(keys))
        print("| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
        for r in timed:
            print(f"| {r['run']} | " + " | ".join(f"{r['timings'].get(k, 0):.2f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
