"""Speed of Semantic-SAM on this CPU, segany against the reference (UX-Decoder/Semantic-SAM), float32.

    python3 benchmarks/bench_semantic_sam.py --reference /path/to/Semantic-SAM --detectron2 /path/to/detectron2 \\
        --deps /path/to/site-packages-with-fvcore                     # both, mini and released Swin-T
    python3 benchmarks/bench_semantic_sam.py                        # segany only (no reference given)
    python3 benchmarks/bench_semantic_sam.py --configs mini --rounds 1 --threads 1

Two figures per configuration, on DAVIS 000.jpg resized as the reference does (854x480 -> 1138x640):
* image features: normalise, pad, Swin backbone, pixel decoder (segany: `SamPredictor.set_image`, which
  also projects the decoder's per-image values; the reference: its `backbone` + `pixel_decoder.
  forward_features`, as `evaluate_demo` runs them);
* one click: six granularity levels with their scores, masks at the image's size, given the image's
  features (segany: `SamPredictor.predict`; the reference: `evaluate_demo(..., mask_features=...,
  multi_scale_features=...)`). A sample is the mean over --clicks clicks at seeded random places.

Each implementation runs in its own process per round (rounds interleaved, the order alternating), the
same torch thread count in both; one untimed features call and one untimed click first. Reported: the
medians over rounds of CPU time (process_time) and wall time, the ratio reference / segany, and the
agreement of the two on the first click (same weights): IoU scores and full-size logits.

Weights: `mini` = the fixture checkpoint (../shared/fixtures/semantic_sam); `swin-t` = seeded random
values for every key of the released Swin-T checkpoint (`swint_keys.json`, shared tensors kept shared),
written once to a temporary file that both load. Speed does not depend on the values.

The reference is not part of segany and is never imported by it: give the paths of a checkout of
UX-Decoder/Semantic-SAM (the fixtures used commit e11f8b5), of detectron2's Python sources (no compiled
extension is needed) and optionally of a folder holding fvcore/iopath/omegaconf/yacs/termcolor/tabulate/
portalocker (pure Python). It runs with the same runtime stand-ins the fixtures were made with (README of
../shared/fixtures/semantic_sam): no CUDA, its PyTorch deformable attention, refshim's torchvision/timm.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGE = SHARED / "datasets" / "davis345" / "images" / "000.jpg"
FIXTURES = SHARED / "fixtures" / "semantic_sam"
MINI = FIXTURES / "semantic_sam_mini_seed0.pth"
REFSHIM = SHARED / "tools" / "refshim"
AGREE_STRIDE = 4  # full-size logits compared on every 4th row and column


# ---- weights and inputs (main process) ---------------------------------------------------------------


def swin_t_weights(path: Path) -> None:
    """Seeded random values for the released Swin-T key list; shared tensors stay shared."""
    import torch

    sys.path.insert(0, str(ROOT))
    from segany.modeling.semantic_sam import SemanticSam, swin_t_config

    keys = json.loads((FIXTURES / "swint_keys.json").read_text())
    model = SemanticSam(swin_t_config())
    ours = {"model." + k: v for k, v in model.state_dict().items()}
    listed = {k: tuple(shape) for k, shape, _ in keys}
    if listed != {k: tuple(v.shape) for k, v in ours.items()}:
        raise SystemExit("swint_keys.json and segany's Swin-T configuration disagree")
    g = torch.Generator().manual_seed(0)
    by_storage: Dict[int, torch.Tensor] = {}
    sd = {}
    for key, shape, _ in keys:
        t = ours[key]
        ptr = t.data_ptr()
        if ptr in by_storage:
            sd[key] = by_storage[ptr]
            continue
        if not t.is_floating_point():  # relative_position_index: the construction's values
            value = t.clone()
        elif t.dim() == 1:
            is_norm_scale = key.endswith("weight") and ("norm" in key.rsplit(".", 2)[-2])
            value = 0.1 * torch.randn(shape, generator=g) + (1.0 if is_norm_scale else 0.0)
        else:
            fan_in = int(np.prod(shape[1:]))
            value = torch.randn(shape, generator=g) * fan_in ** -0.5
        by_storage[ptr] = sd[key] = value
    torch.save(sd, path)


def model_frame_image(path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from segany.predict.inputs import load_image
    from segany.predict.semantic_sam_predictor import resize_short_edge

    np.save(path, resize_short_edge(load_image(IMAGE), 640))


# ---- workers (one process per implementation and round) -----------------------------------------------


def reference_model(args, weights: Path):
    """The reference's own build and loader, with the fixtures' runtime stand-ins."""
    import types

    sys.path[:0] = [str(REFSHIM)] + ([args.deps] if args.deps else []) + [args.detectron2, args.reference]
    os.chdir(args.reference)  # its configs are read relative to the checkout
    import torch
    import torchvision.ops as tv_ops

    def unavailable(*_a, **_k):
        raise RuntimeError("not available in this CPU stand-in")

    for name in ("deform_conv2d", "roi_align", "RoIPool", "roi_pool", "ps_roi_align", "RoIAlign", "nms_rotated"):
        if not hasattr(tv_ops, name):
            setattr(tv_ops, name, unavailable)

    class Stub(types.ModuleType):  # training-only imports; MultiScaleDeformableAttention -> PyTorch path
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {"__init__": unavailable})

    for name in ("timm.loss", "kornia", "kornia.contrib", "transformers", "MultiScaleDeformableAttention"):
        sys.modules[name] = Stub(name)
    sys.modules["kornia"].__path__ = []
    torch.Tensor.cuda = lambda self, *a, **k: self
    to = torch.Tensor.to

    def to_cpu(self, *a, **k):
        a = tuple("cpu" if isinstance(x, str) and x.startswith("cuda") else x for x in a)
        if isinstance(k.get("device"), str) and k["device"].startswith("cuda"):
            k["device"] = "cpu"
        return to(self, *a, **k)

    torch.Tensor.to = to_cpu
    np.float = float
    import logging

    logging.disable(logging.WARNING)
    from semantic_sam import build_model
    from semantic_sam.BaseModel import BaseModel
    from utils.arguments import load_config_dict_to_opt, load_opt_from_config_file

    opt = load_opt_from_config_file("configs/semantic_sam_only_sa-1b_swinT.yaml")
    overrides = {"MODEL.BACKBONE.LOAD_PRETRAINED": False}
    if args.config == "mini":
        overrides.update(json.loads((FIXTURES / "manifest.json").read_text())["model"]["overrides"])
    load_config_dict_to_opt(opt, overrides)
    model = BaseModel(opt, build_model(opt)).from_pretrained(str(weights)).eval()
    # its loader drops mismatched keys silently: check that every stored value arrived
    stored = {k[6:]: v for k, v in torch.load(str(weights), map_location="cpu").items()}
    state = model.model.state_dict()
    bad = [k for k, v in stored.items() if k not in state or not torch.equal(state[k], v.to(state[k].dtype))]
    if bad or len(stored) != len(state):
        raise SystemExit(f"reference did not load the weights: {len(bad)} keys differ, {len(stored)} vs {len(state)}")
    return model.model


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    image = np.load(args.image)  # (H, W, 3) uint8 in the model frame
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    clicks = rng.uniform(0.05, 0.95, size=(args.clicks + 1, 2))  # relative (x, y); the first is the warm-up
    weights = Path(args.weights)

    if args.worker == "segany":
        sys.path.insert(0, str(ROOT))
        import segany

        predictor = segany.SamPredictor(segany.load_model(weights))

        def features():
            predictor.set_image(image)

        def click(x, y):
            return predictor.predict(point_coords=[[x * w, y * h]])

        def agreement(x, y):
            from segany.modeling.semantic_sam import LEVEL_TO_TOKEN, LEVELS

            logits, scores, _ = predictor.predict(point_coords=[[x * w, y * h]], return_logits=True)
            order = np.argsort([LEVEL_TO_TOKEN[level] for level in LEVELS])  # level order -> token order
            return logits[order], scores[order]
    else:
        model = reference_model(args, weights)
        from detectron2.structures import ImageList  # importable once reference_model has set the paths

        state = {}

        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1)

        @torch.no_grad()
        def features():
            x = ImageList.from_tensors([(tensor - model.pixel_mean) / model.pixel_std], model.size_divisibility).tensor
            mask_features, _, multi_scale = model.sem_seg_head.pixel_decoder.forward_features(model.backbone(x), None)
            state["features"] = (mask_features, multi_scale)

        @torch.no_grad()
        def click(x, y):
            point = torch.tensor([[x, y, 0.005, 0.005]], dtype=torch.float32)
            data = {"image": tensor, "height": h, "width": w, "targets": [{"points": point, "pb": point.new_tensor([0.0])}]}
            mask_features, multi_scale = state["features"]
            return model.evaluate_demo([data], mask_features=mask_features, multi_scale_features=multi_scale)

        def agreement(x, y):
            masks, ious = click(x, y)
            return masks.numpy(), ious[0, 0].numpy()

    def timed(fn, *a):
        c, t = time.process_time(), time.perf_counter()
        fn(*a)
        return time.process_time() - c, time.perf_counter() - t

    features()  # warm-up: allocations, caches
    feat_cpu, feat_wall = timed(features)
    click(*clicks[0])
    c, t = time.process_time(), time.perf_counter()
    for x, y in clicks[1:]:
        click(x, y)
    click_cpu, click_wall = (time.process_time() - c) / args.clicks, (time.perf_counter() - t) / args.clicks
    if args.agree_out:
        logits, ious = agreement(*clicks[1])
        np.savez(args.agree_out, logits=logits[:, ::AGREE_STRIDE, ::AGREE_STRIDE].astype(np.float32),
                 ious=np.asarray(ious, dtype=np.float32))
    print(json.dumps({"features_cpu": feat_cpu, "features_wall": feat_wall,
                      "click_cpu": click_cpu, "click_wall": click_wall}))


# ---- main: rounds, medians, ratios, agreement ----------------------------------------------------------


def run_worker(args, impl: str, config: str, weights: Path, image: Path, agree_out: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--config", config,
           "--weights", str(weights), "--image", str(image), "--threads", str(args.threads), "--clicks", str(args.clicks)]
    if impl == "reference":
        cmd += ["--reference", args.reference, "--detectron2", args.detectron2] + (["--deps", args.deps] if args.deps else [])
    if agree_out is not None:
        cmd += ["--agree-out", str(agree_out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{impl} {config}: worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(ref: Path, ours: Path) -> str:
    r, o = np.load(ref), np.load(ours)
    d_iou = float(np.abs(r["ious"] - o["ious"]).max())
    rl, ol = r["logits"], o["logits"]
    d_logit = float((np.abs(rl - ol) / (1 + np.abs(rl))).max())
    away = np.abs(rl) > 2e-3
    flips = int(((rl > 0) != (ol > 0))[away].sum())
    return f"IoU |d| {d_iou:.1e}, logits |d|/(1+|ref|) {d_logit:.1e}, mask flips {flips}/{away.sum()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="mini,swin-t")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", help="checkout of UX-Decoder/Semantic-SAM (commit e11f8b5)")
    parser.add_argument("--detectron2", help="detectron2's sources (the folder holding detectron2/ and projects/)")
    parser.add_argument("--deps", help="folder with fvcore, iopath, omegaconf, yacs, ... (pure Python)")
    parser.add_argument("--worker", choices=["segany", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--agree-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if not MINI.exists() or not IMAGE.exists():
        raise SystemExit(f"needs ../shared (fixtures and datasets): {MINI.parent} not found")
    impls = ["segany"]
    if args.reference and args.detectron2:
        missing = [p for p in (args.reference, args.detectron2) if not Path(p).is_dir()]
        if missing:
            raise SystemExit(f"reference paths not found: {', '.join(missing)}")
        impls = ["reference", "segany"]
    else:
        print("# reference not given (--reference, --detectron2): segany only, no ratio")
    import torch

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.rounds} round(s), click = mean of {args.clicks}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    rows: List[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_ssam_") as tmp:
        tmp = Path(tmp)
        image = tmp / "image.npy"
        model_frame_image(image)
        for config in args.configs.split(","):
            if config == "mini":
                weights = MINI
            elif config == "swin-t":
                weights = tmp / "swin_t_random.pth"
                swin_t_weights(weights)
            else:
                raise SystemExit(f"unknown config {config!r} (mini, swin-t)")
            results: Dict[str, List[dict]] = {impl: [] for impl in impls}
            for r in range(args.rounds):
                for impl in impls if r % 2 == 0 else impls[::-1]:
                    out = tmp / f"{config}_{impl}.npz" if r == 0 else None
                    results[impl].append(run_worker(args, impl, config, weights, image, out))
                    print(f"#   {config} round {r + 1} {impl}: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in results[impl][-1].items()), flush=True)
            med = {impl: {k: statistics.median(x[k] for x in res) for k in res[0]} for impl, res in results.items()}
            s = med["segany"]
            if "reference" in med:
                ref = med["reference"]
                rows.append(
                    f"| {config} | {ref['features_cpu']:.2f} / {ref['features_wall']:.2f} s | "
                    f"{s['features_cpu']:.2f} / {s['features_wall']:.2f} s | "
                    f"{ref['features_cpu'] / s['features_cpu']:.2f}x / {ref['features_wall'] / s['features_wall']:.2f}x | "
                    f"{ref['click_cpu'] * 1e3:.0f} / {ref['click_wall'] * 1e3:.0f} ms | "
                    f"{s['click_cpu'] * 1e3:.0f} / {s['click_wall'] * 1e3:.0f} ms | "
                    f"{ref['click_cpu'] / s['click_cpu']:.1f}x / {ref['click_wall'] / s['click_wall']:.1f}x | "
                    f"{agreement(tmp / f'{config}_reference.npz', tmp / f'{config}_segany.npz')} |")
            else:
                rows.append(f"| {config} | | {s['features_cpu']:.2f} / {s['features_wall']:.2f} s | | | "
                            f"{s['click_cpu'] * 1e3:.0f} / {s['click_wall'] * 1e3:.0f} ms | | |")
    print()
    print("Medians, CPU / wall time; ratio = reference / segany (higher is faster)")
    print()
    print("| config | features, reference | features, segany | ratio | click, reference | click, segany | ratio | agreement (first click) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
