"""FastSAM everything mode: segany vs ultralytics 8.4.190 on the same weights and image, and vs SAM vit_b.

    python benchmarks/bench_fastsam.py --no-sam --threads 2 --rounds 3 --repeats 3   # the target's run
    python benchmarks/bench_fastsam.py --scales s --rounds 1 --repeats 1 --no-sam    # quick

Every measurement runs in its own process (one model in memory, no shared caches), with the same
thread count on both sides: ultralytics sets its own count (cores - 1, at most 8) when its predictor
is set up, so each worker pins the count again after its warm-up and checks it after the timed runs.
Weights: FastSAM-s = ../shared/fixtures/fastsam/fastsam_s_random.pt (random, conditioned, released
layout); FastSAM-x = yolov8x-seg (nc=1) built by ultralytics with seeded random weights, its
BatchNorms randomised and its class biases set so that about 2 % of the anchors pass conf 0.4 on this
image, saved as a state dict that both sides load. Released weights cannot be downloaded here.
Detections: with random weights, how many anchors pass conf 0.4 is set by those class biases (the
fixture's: 251 masks on davis345/000, about what FastSAM gives on a busy photo); the mask stage's
share of the time grows with that count, so the table reports it per implementation.
Mask agreement: for each ultralytics mask, the best IoU with a segany mask of the same run; the
ultralytics row gives the same measure for ultralytics on the image with +-1 grey level of noise,
the sensitivity of these random weights against which a reduced-precision network is read.
Timing: median of --repeats runs after one warm-up, from the RGB array to boxes + full-size masks;
wall and CPU (process) seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURE = SHARED / "fixtures" / "fastsam" / "fastsam_s_random.pt"
sys.path.insert(0, str(ROOT))


def load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(path).convert("RGB"))


def timed(fn, repeats: int, threads: int):
    """Median wall and CPU (process) seconds of `repeats` calls after one warm-up, at `threads` threads."""
    import torch

    fn()  # warm-up (ultralytics sets its own thread count while it sets up: pinned again below)
    torch.set_num_threads(threads)
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    if torch.get_num_threads() != threads:
        raise SystemExit(f"the thread count changed to {torch.get_num_threads()} during the timed runs")
    return float(np.median(walls)), float(np.median(cpus)), out


def save_masks(path: str, masks: np.ndarray, scores: np.ndarray) -> None:
    np.savez_compressed(path, masks=np.packbits(masks, axis=-1), shape=np.array(masks.shape), scores=scores)


def load_masks(path: str) -> np.ndarray:
    z = np.load(path)
    return np.unpackbits(z["masks"], axis=-1)[..., : z["shape"][-1]].astype(bool)


# ------------------------------------------------------------------------------- workers


def import_ultralytics(tmp: str):
    sys.path.insert(0, str(SHARED / "tools" / "refshim"))
    os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=tmp, YOLO_VERBOSE="0")
    import ultralytics

    return ultralytics


def worker_ultralytics(args) -> dict:
    import torch

    ul = import_ultralytics(args.tmp)
    rgb = load_rgb(args.image)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    fs = ul.FastSAM(str(FIXTURE))
    if args.scale == "x":
        import importlib.resources

        text = (importlib.resources.files("ultralytics") / "cfg/models/v8/yolov8-seg.yaml").read_text()
        yaml = Path(args.tmp) / "yolov8x-seg.yaml"
        yaml.write_text(text.replace("nc: 80", "nc: 1"))
        torch.manual_seed(0)
        model = ul.YOLO(str(yaml)).model.eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                    m.eps = 1e-3
            condition_x(model, bgr, args.imgsz, ul)
        fs.model.model = model.model  # the FastSAM wrapper, x-scale layers
        fs.model.yaml = model.yaml
        fs.model.stride = model.stride
        torch.save({k: v.clone() for k, v in fs.model.state_dict().items()}, args.weights)
    torch.set_num_threads(args.threads)
    predict = lambda image: fs.predict(image, imgsz=args.imgsz, conf=args.conf, iou=0.9, retina_masks=True, device="cpu",
                                       verbose=False)[0]
    seconds, cpu, out = timed(lambda: predict(bgr), args.repeats, args.threads)
    as_masks = lambda r: r.masks.data.numpy().astype(bool) if r.masks is not None else np.zeros((0,) + rgb.shape[:2], bool)
    masks = as_masks(out)
    save_masks(args.out, masks, out.boxes.conf.numpy() if out.boxes is not None else np.zeros(0))
    # How much these weights' masks move when the image changes by +-1 grey level (not timed): the
    # scale against which a reduced-precision network's agreement is read.
    noisy = np.clip(bgr.astype(np.int16) + np.random.default_rng(0).integers(-1, 2, bgr.shape), 0, 255).astype(np.uint8)
    save_masks(args.out.replace(".npz", "_noise.npz"), as_masks(predict(noisy)), np.zeros(0))
    return {"seconds": seconds, "cpu": cpu, "masks": int(len(masks))}


def condition_x(model, bgr, imgsz, ul) -> None:
    """Running statistics measured on this image, and class biases putting ~2 % of anchors above 0.4."""
    import torch

    from segany.predict.yolo_postprocess import letterbox, to_input

    x = to_input(letterbox(np.ascontiguousarray(bgr[..., ::-1]), imgsz)[0])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:  # one pass in training mode: each layer's statistics on this image
        bn.train()
        bn.momentum = None
        bn.reset_running_stats()
    model(x)
    model.eval()
    head = model.model[-1]
    feats = []
    hooks = [head.cv3[i].register_forward_hook(lambda m, a, o: feats.append(o)) for i in range(len(head.cv3))]
    model(x)
    for h in hooks:
        h.remove()
    for i, logits in enumerate(feats):
        values = logits.flatten()
        target = torch.quantile(values, 0.98)
        head.cv3[i][2].bias -= target - float(np.log(0.4 / 0.6)) - 0.05


def worker_segany(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import segany
    from segany.predict.fastsam import FastSam

    torch.set_num_threads(args.threads)
    rgb = load_rgb(args.image)
    model = segany.load_model(args.weights, mode="exact" if args.variant == "exact" else "fast")
    runner = FastSam(model, bfloat16=args.variant == "fast-bf16")
    from segany.predict.fastsam import FastSamSettings

    runner.settings = FastSamSettings(imgsz=args.imgsz, conf=args.conf).validate()
    seconds, cpu, out = timed(lambda: runner.everything(rgb), args.repeats, args.threads)
    save_masks(args.out, out.masks, out.scores)
    return {"seconds": seconds, "cpu": cpu, "masks": int(len(out))}


def worker_sam(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from segany.modeling import SAM_CONFIGS, build_sam
    from segany.predict.amg import AmgSettings, MaskGenerator
    from segany.engine.precision import make_fast

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_sam(SAM_CONFIGS["vit_b"]).eval()
    if args.variant == "fast":
        make_fast(model)
    model.mode = args.variant
    rgb = load_rgb(args.image)
    # released defaults (32x32 grid); --sam-permissive: thresholds 0, so that every mask of the random
    # weights goes through every stage (upscaling, NMS, RLE), the most work everything mode can do
    settings = AmgSettings(pred_iou_thresh=0.0, stability_score_thresh=0.0) if args.sam_permissive else AmgSettings()
    gen = MaskGenerator(model, settings.validate())
    seconds, cpu, records = timed(lambda: gen.generate_records(rgb), max(1, args.repeats // 2), args.threads)
    return {"seconds": seconds, "cpu": cpu, "masks": int(len(records))}


# ------------------------------------------------------------------------------- driver


def spawn(role: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", role] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{role} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(ref: np.ndarray, ours: np.ndarray) -> str:
    if len(ref) == 0 or len(ours) == 0:
        return "n/a (no masks)"
    r = ref.reshape(len(ref), -1).astype(np.float32)
    o = ours.reshape(len(ours), -1).astype(np.float32)
    inter = r @ o.T
    union = r.sum(1)[:, None] + o.sum(1)[None, :] - inter
    best = (inter / np.maximum(union, 1)).max(1)
    return f"mean {best.mean():.4f}, min {best.min():.4f}, {np.mean(best >= 0.9) * 100:.0f}% >= 0.9"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None)
    parser.add_argument("--scales", default="s,x")
    parser.add_argument("--scale", default="s")
    parser.add_argument("--variant", default="exact")
    parser.add_argument("--variants", default="exact,fast-fp32,fast-bf16", help="segany variants to time")
    parser.add_argument("--image", default=str(SHARED / "datasets" / "davis345" / "images" / "000.jpg"))
    parser.add_argument("--imgsz", type=int, default=1024)
    parser.add_argument("--conf", type=float, default=0.4, help="FastSAM's default 0.4 (the target's setting)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-sam", action="store_true")
    parser.add_argument("--sam-permissive", type=int, default=0)
    parser.add_argument("--weights", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--tmp", default="")
    args = parser.parse_args()
    if args.worker:
        result = {"ultralytics": worker_ultralytics, "segany": worker_segany, "sam": worker_sam}[args.worker](args)
        print(json.dumps(result))
        return
    if not FIXTURE.is_file():
        raise SystemExit("../shared/fixtures/fastsam is absent: no FastSAM weights to benchmark")
    tmp = tempfile.mkdtemp(prefix="bench_fastsam_")
    common = dict(image=args.image, imgsz=args.imgsz, conf=args.conf, repeats=args.repeats, threads=args.threads, tmp=tmp)
    rows = []
    variants = tuple(v for v in args.variants.split(",") if v)
    for scale in args.scales.split(","):
        weights = str(FIXTURE) if scale == "s" else f"{tmp}/fastsam_x_random.pt"
        wall = {name: [] for name in ("ultralytics",) + variants}
        cpu = {name: [] for name in wall}
        counts = {}
        # Rounds interleave the implementations so that a change in the machine's load hits all of them.
        for _ in range(args.rounds):
            ref = spawn("ultralytics", scale=scale, weights=weights, out=f"{tmp}/ul_{scale}.npz", **common)
            wall["ultralytics"].append(ref["seconds"])
            cpu["ultralytics"].append(ref["cpu"])
            counts["ultralytics"] = ref["masks"]
            for variant in variants:
                out = f"{tmp}/sg_{scale}_{variant}.npz"
                res = spawn("segany", scale=scale, variant=variant, weights=weights, out=out, **common)
                wall[variant].append(res["seconds"])
                cpu[variant].append(res["cpu"])
                counts[variant] = res["masks"]
        ref_masks = load_masks(f"{tmp}/ul_{scale}.npz")
        ref_wall, ref_cpu = float(np.median(wall["ultralytics"])), float(np.median(cpu["ultralytics"]))
        noise = agreement(ref_masks, load_masks(f"{tmp}/ul_{scale}_noise.npz"))
        rows.append((f"FastSAM-{scale}", "ultralytics 8.4.190 (fused float32)", wall["ultralytics"], cpu["ultralytics"],
                     1.0, 1.0, counts["ultralytics"], f"reference; itself on the image +-1 grey level: {noise}"))
        for variant in variants:
            rows.append((f"FastSAM-{scale}", f"segany {variant}", wall[variant], cpu[variant],
                         ref_wall / float(np.median(wall[variant])), ref_cpu / float(np.median(cpu[variant])),
                         counts[variant], agreement(ref_masks, load_masks(f"{tmp}/sg_{scale}_{variant}.npz"))))
        print(f"FastSAM-{scale} wall seconds per round: {json.dumps(wall)}; CPU: {json.dumps(cpu)}", flush=True)
    if not args.no_sam:
        res = spawn("sam", variant="fast", sam_permissive=int(args.sam_permissive), **common)
        label = "thresholds 0" if args.sam_permissive else "default thresholds"
        rows.append(("SAM vit_b", f"segany fast, 32x32 grid, {label}", [res["seconds"]], [res["cpu"]], None, None,
                     res["masks"], "n/a"))
    import torch

    print(f"\nimage {Path(args.image).name}, imgsz {args.imgsz}, conf {args.conf}, iou 0.9, retina masks, "
          f"{args.threads} thread(s) on both sides, torch {torch.__version__}; {args.rounds} round(s), each process: a "
          f"warm-up then the median of {args.repeats} (SAM: {max(1, args.repeats // 2)}); seconds = median over rounds "
          f"[each round's]; CPU = process time (all threads)\n")
    print("| model | implementation | wall s | CPU s | speed-up (wall / CPU) | detections | mask agreement with ultralytics (best IoU per reference mask) |")
    print("|---|---|---|---|---|---|---|")
    for model, impl, walls, cpus, ratio, cpu_ratio, n, agree in rows:
        each = ", ".join(f"{v:.2f}" for v in walls)
        speed = "" if ratio is None else f"{ratio:.2f}x / {cpu_ratio:.2f}x"
        print(f"| {model} | {impl} | {np.median(walls):.2f} [{each}] | {np.median(cpus):.2f} | {speed} | {n} | {agree} |")


if __name__ == "__main__":
    main()
