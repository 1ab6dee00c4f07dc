"""segany against the runtimes a CPU user would pick instead: the released PyTorch code, ONNX Runtime
(fp32, int8 dynamic) and OpenVINO (bf16, f32) on the released code's own graphs. Benchmark only.

    pip install 'segany[bench]'
    python3 benchmarks/bench_peers.py --models vit_b,vit_t --rounds 3
    python3 benchmarks/bench_peers.py --models vit_h --rounds 1 --rows encoder,click
    python3 benchmarks/bench_peers.py --models vit_b --rounds 1 --rows everything --amg permissive

Every backend runs in its own process, one process per backend per round; the rounds are interleaved
(every backend once per round, the order rotated from round to round) and each figure is the median over
rounds (min-max beside it). In each process: load, one untimed call of every row, then one timed sample
per row (a click sample: the mean of 10 consecutive clicks). Same seeded random weights (the released
model's state dict, written once), same image (davis345/images/000.jpg), same prompts for every backend.
Rows: encoder (set_image: resize, normalise, pad, encoder), one click (one point, multimask, masks at the
image's size), 64 prompts (one point each, one batch, masks at full size, per prompt) and, with
`--rows ...,everything`, everything mode (32x32 grid; `--amg released`: the released thresholds, which
random weights never pass, so no mask is upscaled; `--amg permissive`: pred_iou_thresh 0, stability
0.5 / offset 0.05, every output passes the IoU filter and is upscaled). The peers' everything mode is the
released generator over their decoder graph. Agreement: each backend's embedding and click logits
against the released float32 code's (relative L2), click mask IoU where |released logit| > 0.05.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # this tree's segany, not an installed one

import peers_stats as stats  # noqa: E402

CLICKS_PER_SAMPLE = 10
AMG_SETTINGS = {
    "released": {},
    "permissive": dict(pred_iou_thresh=0.0, stability_score_thresh=0.5, stability_score_offset=0.05),
}
RUNTIME_MODULE = {"ort": "onnxruntime", "ov": "openvino"}


# ---------------------------------------------------------------------------------------------- worker


def run_worker(backend: str, model: str, workdir: Path, rows, threads: int, save: Path | None, amg: str,
               points_per_side: int = 32) -> dict:
    """One process's samples for one backend: {"times": {row: seconds}, "masks": n}; embedding and click
    logits saved under `save` (the first round)."""
    import numpy as np
    import torch

    import peers_backends as pb

    torch.set_num_threads(threads)
    image = pb.load_image()
    points = pb.prompts64(image.shape)
    b = pb.make_backend(backend, model, workdir, threads)
    out = {"times": {}}
    b.set_image(image)  # warm-up, and the image the decode rows use
    if save is not None:
        np.save(save / f"{backend}.embedding.npy", b.embedding())
        np.save(save / f"{backend}.click.npy", np.asarray(b.click()[1], np.float32))
    calls = {
        "encoder": lambda: b.set_image(image),
        "click": b.click,
        "prompts64": lambda: b.prompts64(points),
    }
    for row in rows:
        if row == "everything":
            start = time.perf_counter()
            out["masks"] = b.everything(image, dict(AMG_SETTINGS[amg], points_per_side=points_per_side))
            out["times"][row] = time.perf_counter() - start
            continue
        n = CLICKS_PER_SAMPLE if row == "click" else 1
        calls[row]()  # untimed: a runtime's first call of a shape prepares it
        start = time.perf_counter()
        for _ in range(n):
            calls[row]()
        seconds = (time.perf_counter() - start) / n
        out["times"][row] = seconds / 64 if row == "prompts64" else seconds
    return out


# ---------------------------------------------------------------------------------------------- driver


def available(backend: str) -> bool:
    runtime = RUNTIME_MODULE.get(backend.split("-", 1)[0])
    return runtime is None or importlib.util.find_spec(runtime) is not None


def subprocess_json(args, timeout: float | None = None) -> dict:
    """Run this script with `args` in a fresh process; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(model: str, backends, rows, rounds: int, workdir: Path, threads: int, amg: str, log,
                points_per_side: int = 32) -> dict:
    """All rounds for one model; returns samples, stats, agreement and errors."""
    import numpy as np

    graphs = any(b.split("-", 1)[0] in RUNTIME_MODULE for b in backends)
    int8 = any(b.endswith("int8") for b in backends)
    log(f"[{model}] preparing weights{' and graphs' if graphs else ''} ...")
    t = time.perf_counter()
    subprocess_json(["--prepare", "--model", model, "--workdir", str(workdir)]
                    + ([] if graphs else ["--no-onnx"]) + ([] if int8 else ["--no-int8"]))
    log(f"[{model}] prepared in {time.perf_counter() - t:.0f} s")
    save = workdir / model / "outputs"
    save.mkdir(parents=True, exist_ok=True)
    samples = {b: {r: [] for r in rows} for b in backends}
    masks, errors = {}, {}
    for rnd, backend in stats.schedule(backends, rounds):
        if backend in errors:
            continue
        args = ["--worker", backend, "--model", model, "--workdir", str(workdir), "--rows", ",".join(rows),
                "--threads", str(threads), "--amg", amg, "--points-per-side", str(points_per_side)]
        if rnd == 0:
            args += ["--save", str(save)]
        t = time.perf_counter()
        try:
            res = subprocess_json(args)
        except Exception as err:  # a backend that fails is reported, the others still run
            errors[backend] = str(err)
            log(f"[{model}] round {rnd} {backend}: FAILED {err}")
            continue
        for row, seconds in res["times"].items():
            samples[backend][row].append(seconds)
        if "masks" in res:
            masks[backend] = res["masks"]
        shown = ", ".join(f"{r} {stats.fmt_time(s)}" for r, s in res["times"].items())
        log(f"[{model}] round {rnd} {backend}: {shown} ({time.perf_counter() - t:.0f} s in all)")
    agreement = {}
    ref = save / "released.embedding.npy"
    for backend in backends:
        if backend in errors or backend == "released" or not ref.is_file():
            continue
        emb, click = np.load(save / f"{backend}.embedding.npy"), np.load(save / f"{backend}.click.npy")
        ref_click = np.load(save / "released.click.npy")
        agreement[backend] = {
            "embedding": stats.rel_l2(np.load(ref), emb),
            "click": stats.rel_l2(ref_click, click),
            "iou": stats.mask_iou(ref_click, click),
        }
    return {"samples": samples, "stats": stats.medians(samples), "agreement": agreement, "masks": masks,
            "errors": errors}


def machine(threads: int) -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for mod in ("torch", "onnxruntime", "openvino"):
        if importlib.util.find_spec(mod) is not None:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?').split('-')[0]}")
    try:
        load = " load average %.1f %.1f %.1f at the start;" % os.getloadavg()
    except OSError:
        load = ""
    return f"{cpu}, {os.cpu_count()} cores,{load} {threads} threads per backend; {', '.join(versions)}"


def report(results: dict, backends, rows, rounds: int, threads: int, amg: str, command: str,
           points_per_side: int = 32) -> str:
    lines = [f"Machine: {machine(threads)}", f"Command: `{command}`",
             f"Median of {rounds} interleaved round(s) (min-max beside it), one process per backend per round.", ""]
    for model, res in results.items():
        lines += [stats.table(model, res["stats"], backends, rows), ""]
        if res["masks"]:
            shown = ", ".join(f"{b} {n}" for b, n in res["masks"].items())
            lines += [f"Everything mode ({amg} thresholds, {points_per_side}x{points_per_side} grid) masks: {shown}", ""]
        if res["agreement"]:
            lines += [stats.agreement_table(model, res["agreement"]), ""]
        for backend, err in res["errors"].items():
            lines += [f"{model} {backend}: failed: {err}", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_b,vit_t", help="comma-separated: vit_b, vit_l, vit_h, vit_t")
    ap.add_argument("--backends", default=",".join(stats.BACKENDS), help="comma-separated of " + ", ".join(stats.BACKENDS))
    ap.add_argument("--rows", default="encoder,click,prompts64", help="comma-separated of " + ", ".join(stats.ROWS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amg", choices=sorted(AMG_SETTINGS), default="released", help="everything-mode thresholds")
    ap.add_argument("--points-per-side", type=int, default=32, help="everything-mode grid")
    ap.add_argument("--workdir", type=Path, default=None, help="weights and graphs (kept; default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    ap.add_argument("--json", type=Path, default=None, help="also write every sample here")
    # internal: the per-process steps
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-onnx", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-int8", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    if set(rows) - set(stats.ROWS):
        ap.error(f"unknown rows: {', '.join(sorted(set(rows) - set(stats.ROWS)))}")

    if args.prepare:
        import peers_backends as pb

        pb.prepare(args.workdir, args.model, onnx=not args.no_onnx, int8=not args.no_int8)
        print(json.dumps({"ok": True}))
        return
    if args.worker:
        res = run_worker(args.worker, args.model, args.workdir, rows, args.threads, args.save, args.amg,
                         args.points_per_side)
        print(json.dumps(res))
        return

    import peers_backends as pb

    models = [m for m in args.models.split(",") if m]
    if set(models) - set(pb.MODELS):
        ap.error(f"unknown models: {', '.join(sorted(set(models) - set(pb.MODELS)))}")
    backends = [b for b in args.backends.split(",") if b]
    if set(backends) - set(stats.BACKENDS):
        ap.error(f"unknown backends: {', '.join(sorted(set(backends) - set(stats.BACKENDS)))}")
    if not pb.IMAGE.is_file():
        ap.error(f"{pb.IMAGE} is absent (../shared beside the repository)")
    if "released" not in backends:
        ap.error("the released backend is the agreement's reference: keep it in --backends")
    missing = [b for b in backends if not available(b)]
    for b in missing:
        print(f"skipping {b}: {RUNTIME_MODULE[b.split('-', 1)[0]]} is not installed (pip install 'segany[bench]')",
              file=sys.stderr)
    backends = [b for b in backends if b not in missing]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    command = "python3 benchmarks/bench_peers.py " + " ".join(a for a in (argv or sys.argv[1:]))
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_peers_")
        args.workdir = Path(tmp.name)
    try:
        results = {m: bench_model(m, backends, rows, args.rounds, args.workdir, args.threads, args.amg, log,
                                  args.points_per_side) for m in models}
    finally:
        if tmp is not None:
            tmp.cleanup()
    text = report(results, backends, rows, args.rounds, args.threads, args.amg, command.strip(), args.points_per_side)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps({m: {k: r[k] for k in ("samples", "agreement", "masks", "errors")}
                                         for m, r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
