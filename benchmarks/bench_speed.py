"""Speed of segany (exact and fast modes) against the released implementation, same random weights.

    python benchmarks/bench_speed.py                       # vit_b, vit_t, vit_h; encoder + decode rows
    python benchmarks/bench_speed.py --models vit_b --reps 1 --rows encoder,decode1   # a quick look
    python benchmarks/bench_speed.py --everything --memory --out docs/benchmarks.md

Rows: `encoder` (set_image on a 854x480 DAVIS frame: resize, normalise, encoder), `decode1` (one point,
multimask, masks at the original size), `decode64` (64 one-point prompts through predict_torch, per
prompt), `everything` (SamAutomaticMaskGenerator.generate, released defaults, 32x32 grid; --everything) and
`everything-upscaled` (the same with pred_iou_thresh 0, stability_score_thresh 0.5, offset 0.05; --everything).
With random weights no output passes the released IoU threshold, so the `everything` row upscales no mask
(a best case that real weights do not reach); in `everything-upscaled` every output passes the IoU filter
and is upscaled to full size (the worst case). Real weights fall in between; each row reports how many
masks survive.
Each figure is the median of --reps samples (a decode1 sample: the mean of 10 consecutive calls);
reference, exact and fast samples are interleaved so that load from other processes hits them alike.
segany's first decode of an image also prepares the decoder's image side (kept with the embedding). Agreement of fast with exact: relative L2 error of logits (and
of the embedding) and mask IoU where |exact logit| > 0.05.
The reference packages are imported through ../shared/tools/refshim (benchmark only), or as they are
where torchvision is installed (a GPU machine).
With --device cuda every model runs on the GPU (fast mode: bfloat16) and each sample waits for the
GPU to finish; --memory then reports the peak GPU memory of a vit_h embedding.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFSHIM = SHARED / "tools" / "refshim"
IMAGE = SHARED / "datasets" / "davis345" / "images" / "000.jpg"
ROWS = ("encoder", "decode1", "decode64", "everything", "everything-upscaled")
# Thresholds under which every random-weight output passes the IoU filter (and is upscaled): see the docstring.
UPSCALE_ALL = dict(pred_iou_thresh=0.0, stability_score_thresh=0.5, stability_score_offset=0.05)
# A decode1 sample is the mean of this many consecutive calls (a burst of clicks): one call of about
# 10-50 ms measured alone swung by 30% from sample to sample here; the reference gets the same treatment.
CALLS_PER_SAMPLE = {"decode1": 10}


def reference_model(name: str):
    """A released-code model with seeded random weights."""
    if REFSHIM.is_dir():
        sys.path.insert(0, str(REFSHIM))
    torch.manual_seed(0)
    if name == "vit_t":
        import mobile_sam

        return mobile_sam.sam_model_registry["vit_t"]().eval(), mobile_sam
    import segment_anything

    return segment_anything.sam_model_registry[name]().eval(), segment_anything


def load_image() -> np.ndarray:
    from PIL import Image

    if IMAGE.is_file():
        return np.array(Image.open(IMAGE).convert("RGB"))
    return np.random.default_rng(0).integers(0, 256, (480, 854, 3), dtype=np.uint8)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12))


def mask_iou(exact, other, confident: float = 0.05) -> float:
    exact, other = np.asarray(exact), np.asarray(other)
    keep = np.abs(exact) > confident
    a, b = (exact > 0) & keep, (other > 0) & keep
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously to the Python that feeds it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, rows, reps: int, image: np.ndarray, device: torch.device = torch.device("cpu")) -> dict:
    import segany

    ref_model, ref_pkg = reference_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"random_{name}.pth"
        torch.save(ref_model.state_dict(), path)
        exact = segany.load_model(path, mode="exact", device=device)
        fast = segany.load_model(path, mode="fast", device=device)
    ref_model = ref_model.to(device)
    predictors = {
        "reference": ref_pkg.SamPredictor(ref_model),
        "exact": segany.SamPredictor(exact),
        "fast": segany.SamPredictor(fast),
    }
    result = {"model": name, "times": {}, "agreement": {}}
    with torch.inference_mode():
        for predictor in predictors.values():  # warm-up, and the image every later row uses
            predictor.set_image(image)
        embeddings = {k: p.get_image_embedding().float().cpu().numpy() for k, p in predictors.items()}
        result["agreement"]["embedding exact vs ref (max abs)"] = float(
            np.abs(embeddings["exact"] - embeddings["reference"]).max()
        )
        result["agreement"]["embedding fast rel L2"] = rel_l2(embeddings["exact"], embeddings["fast"])

        point = dict(point_coords=np.array([[400.0, 250.0]]), point_labels=np.array([1]), multimask_output=True)
        gen = torch.Generator().manual_seed(1)
        coords64 = (torch.rand(64, 1, 2, generator=gen) * 1000).to(device)
        labels64 = torch.ones(64, 1, dtype=torch.int, device=device)

        def decode64(p):
            c = p.transform.apply_coords_torch(coords64, p.original_size)
            return p.predict_torch(c, labels64, multimask_output=True)

        tasks = {
            "encoder": lambda p: p.set_image(image),
            "decode1": lambda p: p.predict(**point),
            "decode64": decode64,
        }
        for row in rows:
            if row not in tasks:
                continue
            samples = {k: [] for k in predictors}
            calls = CALLS_PER_SAMPLE.get(row, 1)
            if device.type != "cpu":  # the GPU's first call of a shape picks and loads its kernels
                for predictor in predictors.values():
                    tasks[row](predictor)
            for _ in range(reps):
                for key, predictor in predictors.items():  # interleaved
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(calls):
                        tasks[row](predictor)
                    synchronize(device)
                    samples[key].append((time.perf_counter() - start) / calls)
            result["times"][row] = {k: statistics.median(v) for k, v in samples.items()}
            if row == "decode64":
                result["times"][row] = {k: v / 64 for k, v in result["times"][row].items()}

        # Decoder agreement on the same (exact) embedding: fast decoding alone, and fast end to end.
        low = {}
        for key in ("reference", "exact", "fast"):
            out = decode64(predictors[key])
            low[key] = out[2].float().cpu().numpy()
        result["agreement"]["decode exact vs ref (max abs)"] = float(np.abs(low["exact"] - low["reference"]).max())
        result["agreement"]["decode fast rel L2"] = rel_l2(low["exact"], low["fast"])
        result["agreement"]["decode fast mask IoU"] = mask_iou(low["exact"], low["fast"])

        for row in ("everything", "everything-upscaled"):
            if row not in rows:
                continue
            from segany.predict.amg import SamAutomaticMaskGenerator

            settings = UPSCALE_ALL if row == "everything-upscaled" else {}
            generators = {
                "reference": ref_pkg.SamAutomaticMaskGenerator(ref_model, **settings),
                "exact": SamAutomaticMaskGenerator(exact, **settings),
                "fast": SamAutomaticMaskGenerator(fast, **settings),
            }
            counts = {}
            times = {}
            try:
                for key, generator in generators.items():
                    synchronize(device)
                    start = time.perf_counter()
                    counts[key] = len(generator.generate(image))
                    synchronize(device)
                    times[key] = time.perf_counter() - start
            except Exception as err:  # report the other rows even if the generator fails
                result["agreement"][row] = f"failed: {type(err).__name__}: {err}"
            else:
                result["times"][row] = times
                result["agreement"][f"{row} masks ref/exact/fast"] = "/".join(str(counts[k]) for k in generators)
    return result


def peak_memory_vit_h(device: torch.device) -> float:
    """Peak memory (GiB) of a fresh process that embeds one image with vit_h (random weights, exact mode):
    its resident set on a CPU, the GPU memory PyTorch allocated on a GPU."""
    if device.type == "cuda":
        setup = "p = segany.SamPredictor(build_sam('vit_h').cuda())\ntorch.cuda.reset_peak_memory_stats()\n"
        # bytes -> KiB, as VmHWM
        report = "print(torch.cuda.max_memory_allocated() // 1024)\n"
    else:
        setup = "torch.set_num_threads(2)\np = segany.SamPredictor(build_sam('vit_h'))\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) benchmark process.
        report = (
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "print(int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        )
    code = (
        "import resource, numpy as np, torch, segany\n"
        "from segany.modeling import build_sam\n"
        + setup
        + "p.set_image(np.zeros((480, 854, 3), np.uint8))\n"
        + report
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def machine(device: torch.device = torch.device("cpu")) -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), " if device.type == "cuda" else ""
    from segany.engine import native

    kernels = "on" if device.type == "cpu" and native.library() is not None else "off"
    return (
        f"{gpu}{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.python_implementation()} {platform.python_version()}; segany's compiled CPU kernels "
        f"(fast mode): {kernels}"
    )


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def table(results) -> str:
    lines = [
        "| model | row | reference | segany exact | segany fast | exact speed-up | fast speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for row, t in res["times"].items():
            label = {
                "decode64": "decode64 (per prompt)",
                "everything": "everything (released thresholds; random weights: nothing passes, nothing upscaled)",
                "everything-upscaled": "everything (every output upscaled)",
            }.get(row, row)
            lines.append(
                f"| {res['model']} | {label} | {fmt_time(t['reference'])} | {fmt_time(t['exact'])} | "
                f"{fmt_time(t['fast'])} | {t['reference'] / t['exact']:.2f}x | {t['reference'] / t['fast']:.2f}x |"
            )
    lines += ["", "| model | agreement | value |", "|---|---|---|"]
    for res in results:
        for key, value in res["agreement"].items():
            shown = f"{value:.3g}" if isinstance(value, float) else value
            lines.append(f"| {res['model']} | {key} | {shown} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_b,vit_t,vit_h", help="comma-separated: vit_b, vit_l, vit_h, vit_t")
    parser.add_argument("--rows", default="encoder,decode1,decode64", help=f"comma-separated of {', '.join(ROWS)}")
    parser.add_argument("--everything", action="store_true",
                        help="add the everything-mode rows, released and every-output-upscaled thresholds (vit_b only)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS of a vit_h embedding")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) here")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every model runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA device here")
    torch.set_num_threads(args.threads)
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    image = load_image()
    results = []
    for name in [m for m in args.models.split(",") if m]:
        extra = ["everything", "everything-upscaled"] if args.everything and name == "vit_b" else []
        model_rows = rows + [r for r in extra if r not in rows]
        print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
        results.append(bench_model(name, model_rows, args.reps, image, device))
        print(table(results[-1:]), file=sys.stderr, flush=True)
    text = f"Machine: {machine(device)}\nImage: {image.shape[1]}x{image.shape[0]}; median of {args.reps} interleaved runs.\n\n"
    text += table(results)
    if args.memory:
        what = "GPU memory" if device.type == "cuda" else "RSS"
        peak = peak_memory_vit_h(device)
        text += f"\n\nPeak {what} embedding one image with vit_h (fresh process, exact mode): {peak:.2f} GiB\n"
    print(text)
    if args.out is not None:
        from segany.io.atomic import atomic_write_text

        atomic_write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()
