"""Where an image encoder's time goes: segany (exact or fast) under torch.profiler, OpenVINO under its
per-layer counters (PERF_COUNT), on the released graph and the same random weights as bench_peers.py.

    python3 benchmarks/profile_encoders.py --model vit_b --backend segany-fast
    python3 benchmarks/profile_encoders.py --model vit_t --backend ov-bf16 --workdir /tmp/peers_work

Prints the encoder's time split into kinds of work (matrix products, attention, layer norms, GELU,
element-wise passes and copies, convolutions, other) and into parts of the network (patch embedding or
stem, the transformer blocks, the neck). One warm-up call, then the median of --reps profiled calls
(the profiler's overhead is in the totals: compare the shares, and take absolute times from
bench_peers.py). Benchmark only.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import peers_backends as pb  # noqa: E402

# aten op -> kind of work (self time; views and metadata ops cost nothing and land in "other")
TORCH_KINDS = [
    ("attention", r"scaled_dot_product|flash_attention|softmax|baddbmm|rel_pos|attention_rows"),
    ("matrix products", r"aten::(addmm|mm|bmm|matmul|linear)$|mkldnn.*(linear|matmul)|onednn"),
    ("layer norm", r"layer_norm|native_layer_norm|aten::var|aten::mean|aten::rsqrt|aten::sqrt"),
    ("GELU", r"gelu"),
    ("convolution", r"convolution|conv2d|mkldnn_conv"),
    ("element-wise and copies", r"aten::(add|add_|mul|mul_|div|div_|sub|copy_|clone|contiguous|cat|"
                                r"constant_pad_nd|pad|_to_copy|to|fill_|zero_|where|pow|neg|exp)$"),
]
# OpenVINO node type -> kind of work
OV_KINDS = [
    ("attention", r"ScaledDotProductAttention|Softmax|SDPA"),  # (a fused Subgraph holding a Softmax too)
    ("matrix products", r"FullyConnected|MatMul|Gemm"),
    ("layer norm", r"MVN|Normalize|LayerNorm|RMS"),
    ("GELU", r"Gelu"),
    ("convolution", r"Convolution|Deconvolution"),
    ("element-wise and copies", r"Eltwise|Subgraph|Transpose|Reorder|Concat|Pad|Multiply|Add|Convert|"
                                r"Reshape|Split|StridedSlice|Gather|ScatterUpdate|Broadcast|Select"),
]


def kind_of(name: str, table) -> str:
    for kind, pattern in table:
        if re.search(pattern, name):
            return kind
    return "other"


def part_of(name: str) -> str:
    """Network part from a module path / ONNX node name: stem, blocks (or TinyViT layers), neck."""
    name = name.lower()
    if "neck" in name:
        return "neck"
    if "patch_embed" in name:
        return "patch embedding / stem"
    if "blocks" in name or "layers" in name:
        return "blocks"
    return "other"


@contextlib.contextmanager
def _named_native_kernels():
    """segany's compiled attention kernels (called through ctypes, invisible to torch.profiler) as named
    profiler ranges, so that their time is counted as attention rather than lost."""
    from torch.profiler import record_function

    from segany.engine import image_encoder as ie
    from segany.engine import tiny_vit as tv

    originals = [(module, name, getattr(module, name))
                 for module, names in ((ie, ("attention_rows", "rel_pos_softmax_")), (tv, ("attention_rows",)))
                 for name in names]

    def named(name, fn):
        def call(*args, **kwargs):
            with record_function(f"segany::{name}"):
                return fn(*args, **kwargs)
        return call

    for module, name, fn in originals:
        setattr(module, name, named(name, fn))
    try:
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def profile_segany(model: str, mode: str, weights: Path, reps: int, threads: int) -> dict:
    import segany
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    sam = segany.load_model(weights, mode=mode)
    predictor = segany.SamPredictor(sam)
    image = pb.load_image()
    with torch.inference_mode():
        predictor.set_image(image)  # warm-up
        engine = predictor.segmenter.engine
        # the engine's twin of the encoder (what set_image runs: bfloat16 weights in fast mode), not
        # the plain definition sam.image_encoder, which holds no speed paths
        encoder = engine.net.image_encoder
        x = engine.preprocess(predictor.transform.apply_image_torch(
            torch.as_tensor(image).permute(2, 0, 1)[None].float())).to(engine.dtype)

        # parts: wall time of each top-level child of the encoder, by forward hooks
        parts = defaultdict(list)
        starts = {}
        hooks = []
        for child_name, child in encoder.named_children():
            targets = [(f"{child_name}.{n}", m) for n, m in child.named_children()] if child_name in (
                "blocks", "layers") else [(child_name, child)]
            for name, module in targets:
                hooks.append(module.register_forward_pre_hook(
                    lambda m, a, name=name: starts.__setitem__(name, time.perf_counter())))
                hooks.append(module.register_forward_hook(
                    lambda m, a, o, name=name: parts[name].append(time.perf_counter() - starts[name])))
        totals = []
        for _ in range(reps):
            t = time.perf_counter()
            encoder(x)
            totals.append(time.perf_counter() - t)
        for h in hooks:
            h.remove()

        kinds = defaultdict(float)
        with profile(activities=[ProfilerActivity.CPU]) as prof, _named_native_kernels():
            for _ in range(reps):
                encoder(x)
    ops = {}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6 / reps
        kinds[kind_of(event.key, TORCH_KINDS)] += seconds
        ops[f"{event.key} (x{event.count // reps})"] = seconds
    by_part = defaultdict(float)
    for name, values in parts.items():
        by_part[part_of(name)] += statistics.median(values)
    per_block = {n: statistics.median(v) for n, v in parts.items()}
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:14])
    return {"total": statistics.median(totals), "kinds": dict(kinds), "parts": dict(by_part), "ops": top,
            "modules": per_block}


def profile_openvino(model: str, precision: str, encoder: Path, reps: int, threads: int) -> dict:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(encoder)), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
    request.infer({0: x})  # warm-up
    totals, kinds, parts, exec_types = [], defaultdict(float), defaultdict(float), defaultdict(float)
    for _ in range(reps):
        t = time.perf_counter()
        request.infer({0: x})
        totals.append(time.perf_counter() - t)
        # the runtime graph after OpenVINO's fusions: each executed node with the released graph's
        # layers it absorbed (an attention "Subgraph" holds MatMul, Softmax, MatMul; a FullyConnected
        # its bias and GELU; an MVN the layer norm's scale and shift) and its time of the last call
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "execTimeMcs" not in info:
                continue
            try:
                seconds = float(info["execTimeMcs"].astype(str)) / 1e6 / reps
            except ValueError:  # not executed (constants, inputs)
                continue
            node_type = info["layerType"].astype(str)
            absorbed = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
            described = node_type + " " + ",".join(n.rsplit("/", 1)[-1] for n in absorbed.split(","))
            kinds[kind_of(described, OV_KINDS)] += seconds
            parts[part_of(absorbed.split(",")[0])] += seconds
            exec_types[f"{node_type} [{info['runtimePrecision'].astype(str)}]"] += seconds
    top = dict(sorted(exec_types.items(), key=lambda kv: -kv[1])[:12])
    return {"total": statistics.median(totals), "kinds": dict(kinds), "parts": dict(parts), "kernels": top}


def show(title: str, res: dict) -> str:
    lines = [f"### {title}: {res['total'] * 1000:.0f} ms per encoder call (median, profiler off)", ""]
    for key in ("kinds", "parts", "kernels", "ops"):
        if key not in res:
            continue
        total = sum(res[key].values()) or 1.0
        lines += [f"| {key} | ms | share |", "|---|---|---|"]
        for name, seconds in sorted(res[key].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {seconds * 1000:.1f} | {seconds / total:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_t"])
    ap.add_argument("--backend", default="segany-fast", choices=["segany-fast", "segany-exact", "ov-bf16", "ov-f32"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="bench_peers.py's weights and graphs (reused)")
    args = ap.parse_args()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="profile_encoders_")
        args.workdir = Path(tmp.name)
    try:
        paths = pb.prepare(args.workdir, args.model, onnx=args.backend.startswith("ov"), int8=False)
        if args.backend.startswith("segany"):
            res = profile_segany(args.model, args.backend.split("-")[1], paths["weights"], args.reps, args.threads)
        else:
            res = profile_openvino(args.model, args.backend.split("-")[1], paths["encoder"], args.reps, args.threads)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(show(f"{args.model} {args.backend}", res))


if __name__ == "__main__":
    main()
