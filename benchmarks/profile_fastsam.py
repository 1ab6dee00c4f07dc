"""FastSAM everything mode stage by stage: ultralytics 8.4.190 vs segany on the fixture's FastSAM-s weights.

    python benchmarks/profile_fastsam.py --threads 1 --repeats 3

Each implementation in its own process, the same thread count (pinned after ultralytics' setup, which
resets it), CPU (process) seconds per stage, median of --repeats after a warm-up. Stages: pre-processing
(letterbox, tensor), network, NMS (+ boxes to the image), masks (coefficients x prototypes at the image's
resolution, crop, threshold; FastSAM's box rules included on ultralytics' side, which runs them in its
post-processing).
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


def stages_ultralytics(args) -> dict:
    import torch

    sys.path.insert(0, str(SHARED / "tools" / "refshim"))
    os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=tempfile.mkdtemp(), YOLO_VERBOSE="0")
    import ultralytics
    import ultralytics.utils.nms as ul_nms
    import ultralytics.utils.ops as ul_ops
    from PIL import Image

    bgr = np.ascontiguousarray(np.array(Image.open(args.image).convert("RGB"))[..., ::-1])
    model = ultralytics.FastSAM(str(FIXTURE))
    run = lambda: model.predict(bgr, imgsz=args.imgsz, conf=0.4, iou=0.9, retina_masks=True, device="cpu", verbose=False)[0]
    run()
    torch.set_num_threads(args.threads)
    spent: dict = {}

    def clock(owner, name, label):
        inner = getattr(owner, name)

        def timed(*a, **k):
            start = time.process_time()
            out = inner(*a, **k)
            spent[label] = spent.get(label, 0.0) + time.process_time() - start
            return out

        setattr(owner, name, timed)

    predictor = model.predictor
    clock(predictor, "preprocess", "pre")
    clock(predictor, "inference", "network")
    clock(predictor, "postprocess", "post")
    clock(ul_nms, "non_max_suppression", "nms")
    clock(ul_ops, "process_mask_native", "masks")
    rows = []
    for _ in range(args.repeats):
        spent.clear()
        start = time.process_time()
        out = run()
        total = time.process_time() - start
        rows.append({"pre": spent["pre"], "network": spent["network"], "nms": spent["nms"], "masks": spent["post"] - spent["nms"],
                     "total": total, "detections": len(out.boxes)})
    assert torch.get_num_threads() == args.threads
    return median(rows)


def stages_segany(args) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import segany
    from segany.predict import yolo_postprocess as post
    from segany.predict.fastsam import FastSam
    from segany.predict.inputs import load_image

    torch.set_num_threads(args.threads)
    rgb = load_image(args.image)
    variant = args.variant
    runner = FastSam(segany.load_model(str(FIXTURE), mode="exact" if variant == "exact" else "fast"),
                     bfloat16=variant == "fast-bf16")
    rows = []
    for _ in range(args.repeats + 1):
        row = {}
        start = time.process_time()
        boxed, lb = post.letterbox(rgb, args.imgsz)
        x = post.to_input(boxed)
        row["pre"] = time.process_time() - start
        mark = time.process_time()
        pred, protos = runner.run_network(x)
        row["network"] = time.process_time() - mark
        mark = time.process_time()
        result = runner.postprocess(pred[0], protos[0], lb)  # NMS + masks + box rules
        post_seconds = time.process_time() - mark
        row["total"] = time.process_time() - start
        mark = time.process_time()
        det = post.detect(pred[0].float(), 0.4, 0.9, 300, 1)
        post.boxes_to_image(det.boxes, lb)
        row["nms"] = time.process_time() - mark
        row["masks"] = post_seconds - row["nms"]
        row["detections"] = len(result)
        rows.append(row)
    return median(rows[1:])


def median(rows) -> dict:
    return {k: float(np.median([r[k] for r in rows])) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default="")
    parser.add_argument("--variant", default="")
    parser.add_argument("--image", default=str(SHARED / "datasets" / "davis345" / "images" / "000.jpg"))
    parser.add_argument("--imgsz", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(stages_ultralytics(args) if args.worker == "ultralytics" else stages_segany(args)))
        return
    if not FIXTURE.is_file():
        raise SystemExit("../shared/fixtures/fastsam is absent: no FastSAM weights to profile")
    print(f"CPU seconds per stage, {Path(args.image).name}, imgsz {args.imgsz}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| implementation | pre | network | NMS | masks | total | detections |")
    print("|---|---|---|---|---|---|---|")
    for worker, variant in (("ultralytics", ""), ("segany", "exact"), ("segany", "fast-fp32"), ("segany", "fast-bf16")):
        cmd = [sys.executable, __file__, "--worker", worker, "--variant", variant or "none", "--image", args.image,
               f"--imgsz={args.imgsz}", f"--threads={args.threads}", f"--repeats={args.repeats}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{worker} {variant} failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        name = "ultralytics 8.4.190" if worker == "ultralytics" else f"segany {variant}"
        print(f"| {name} | {r['pre']:.3f} | {r['network']:.3f} | {r['nms']:.3f} | {r['masks']:.3f} | {r['total']:.3f} | {r['detections']:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
