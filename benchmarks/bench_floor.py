"""The arithmetic floor of an image encoder on this CPU: how long its matrix products and convolutions
alone take, each at the best rate this machine reaches for its shape, in bfloat16 and in float32 —
and, given bench_peers.py's results, how that floor compares with issue 26's targets (segany fast
>= 1.25x OpenVINO bf16, segany exact >= 1.2x OpenVINO f32).

    python3 benchmarks/bench_floor.py --models vit_b,vit_t
    python3 benchmarks/bench_floor.py --models vit_t --peers /tmp/peers.json   # bench_peers.py --json output

What is counted: the released model's own operations, recorded on PyTorch's meta device (no weights,
no arithmetic) from segany.modeling's definition: every matrix product (linear layers, the attention's
products, the rel-pos terms) and every convolution. Token-wise layers are counted over the image's
positions only (the released code also runs the qkv and output projections over the padding of its
windows; that work is not needed: per input width, the rows of its MLP's first layer). The windows'
padded keys are counted (they are part of the released softmax).

How each is timed: every distinct shape is run on its own, in the dtype, at the thread count, the
fastest of --reps calls after warm-up, through the fastest of the ways PyTorch offers here (a linear
layer: F.linear and oneDNN's linear with its weight packed once; a convolution: channels-last and
contiguous F.conv2d; the attention's products: torch.bmm, or the best linear-layer rate measured, as if
they ran at the large products' rate). The floor is the sum over shapes of FLOP / best rate: it assumes
everything else (layer norms, GELU, softmax, element-wise passes, copies) is free, so it is below any
real implementation's time. A second floor adds the element-wise work the released math has to do at
least once — every GELU, softmax and layer norm value (the engines' softmax runs in float32 in both
modes) — at the best rate measured on a block of 2^18 values in cache (as a fused kernel or a post-op meets
them): GELU as PyTorch's in-place GELU or as what oneDNN's GELU post-op adds to a product, softmax as
PyTorch's or segany's one-pass kernel, layer norm as PyTorch's; the copies, residual adds, padding and
preprocessing stay free. Run it on an
idle machine (the load average is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

SIZE = 1024


class RecordProducts(TorchDispatchMode):
    """Records the shapes of every matrix product and convolution an encoder runs (meta tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear: dict[tuple[int, int, int], int] = defaultdict(int)  # (rows, in, out) -> calls
        self.bmm: dict[tuple[int, int, int, int], int] = defaultdict(int)  # (batch, m, k, n) -> calls
        self.conv: dict[tuple, int] = defaultdict(int)  # (input shape, weight shape, stride, padding, dilation, groups)
        # element-wise work every implementation does at least once: (kind, inner size) -> values
        self.elementwise: dict[tuple[str, int], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (torch.ops.aten.addmm, torch.ops.aten.mm):
            a, b = (args[1], args[2]) if packet is torch.ops.aten.addmm else (args[0], args[1])
            self.linear[(a.shape[0], a.shape[1], b.shape[1])] += 1
        elif packet is torch.ops.aten.bmm:
            a, b = args[0], args[1]
            self.bmm[(a.shape[0], a.shape[1], a.shape[2], b.shape[2])] += 1
        elif packet is torch.ops.aten.convolution:
            x, w = args[0], args[1]
            stride, padding, dilation, transposed, _, groups = args[3:9]
            if transposed:
                raise NotImplementedError("transposed convolutions are not counted")
            self.conv[(tuple(x.shape), tuple(w.shape), tuple(stride), tuple(padding), tuple(dilation), groups)] += 1
        elif packet is torch.ops.aten.gelu:
            self.elementwise[("gelu", args[0].shape[-1])] += args[0].numel()
        elif packet is torch.ops.aten._softmax:
            self.elementwise[("softmax", args[0].shape[args[1]])] += args[0].numel()
        elif packet is torch.ops.aten.native_layer_norm:
            self.elementwise[("layer norm", args[0].shape[-1])] += args[0].numel()
        elif packet in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                        torch.ops.aten._scaled_dot_product_attention_math):
            q, k = args[0], args[1]
            b, h, m, d = q.shape
            self.bmm[(b * h, m, d, k.shape[-2])] += 1  # q k^T
            self.bmm[(b * h, m, k.shape[-2], d)] += 1  # probabilities v
        return func(*args, **kwargs)


def encoder_on_meta(model: str) -> torch.nn.Module:
    from segany.modeling.build import build_sam
    from segany.modeling.tiny_vit import mobile_sam_config

    with torch.device("meta"):
        sam = build_sam(mobile_sam_config() if model == "vit_t" else model)
    return sam.image_encoder.eval()


def record(model: str) -> RecordProducts:
    encoder = encoder_on_meta(model)
    recorder = RecordProducts()
    with torch.no_grad(), recorder:
        encoder(torch.empty(1, 3, SIZE, SIZE, device="meta"))
    # token-wise layers over the image's positions: for each input width, the fewest rows it ran over
    # (its MLP's first layer runs over the positions; qkv and output projections also over padding)
    fewest: dict[int, int] = {}
    for rows, k, _ in recorder.linear:
        fewest[k] = min(rows, fewest.get(k, rows))
    trimmed: dict[tuple[int, int, int], int] = defaultdict(int)
    for (rows, k, n), calls in recorder.linear.items():
        trimmed[(fewest[k], k, n)] += calls
    recorder.linear = trimmed
    return recorder


def seconds_per_call(fn, reps: int) -> float:
    """The fastest of `reps` calls after two warm-up calls: a floor takes the best rate the machine reaches."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples)


def linear_seconds(rows: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    x = torch.randn(rows, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype)
    best = seconds_per_call(lambda: F.linear(x, w, b), reps)
    ops = torch.ops.mkldnn
    if hasattr(ops, "_reorder_linear_weight") and torch.backends.mkldnn.is_available():
        packed = ops._reorder_linear_weight(w, rows)
        best = min(best, seconds_per_call(lambda: ops._linear_pointwise(x, packed, b, "none", [], ""), reps))
    return best


def conv_seconds(spec: tuple, dtype: torch.dtype, reps: int) -> float:
    x_shape, w_shape, stride, padding, dilation, groups = spec
    x = torch.randn(x_shape).to(dtype)
    w = torch.randn(w_shape).to(dtype)
    b = torch.randn(w_shape[0]).to(dtype)
    best = float("inf")
    for layout in (torch.channels_last, torch.contiguous_format):
        xl = x.contiguous(memory_format=layout)
        wl = w.contiguous(memory_format=layout)
        best = min(best, seconds_per_call(lambda: F.conv2d(xl, wl, b, stride, padding, dilation, groups), reps))
    return best


def bmm_seconds(batch: int, m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    a = torch.randn(batch, m, k).to(dtype)
    b = torch.randn(batch, k, n).to(dtype)
    return seconds_per_call(lambda: torch.bmm(a, b), reps)


# Element-wise work is timed on a block of this many values (1 MB in float32: in cache, as a fused
# kernel or a post-op meets it), and counted at that rate for every value the encoder has.
ELEMENTWISE_BLOCK = 1 << 18


def elementwise_seconds(kind: str, inner: int, values: int, dtype: torch.dtype, reps: int) -> float:
    """Seconds for `values` values of GELU, softmax (float32: the engines' softmax is float32 in both
    modes) or layer norm over rows of `inner`, at the rate PyTorch's own operation reaches on a block in
    cache."""
    rows = max(1, ELEMENTWISE_BLOCK // inner)
    if kind == "softmax":  # the cheaper of PyTorch's softmax and segany's one-pass kernel (bias zero)
        x = torch.randn(rows, inner)
        seconds = seconds_per_call(lambda: torch.softmax(x, -1), reps)
        from segany.engine import rel_pos_softmax

        lib = rel_pos_softmax.library()
        if lib is not None:
            zeros_h, zeros_w = torch.zeros(rows, 1, 1), torch.zeros(rows, 1, inner)
            seconds = min(seconds, seconds_per_call(lambda: rel_pos_softmax.rel_pos_softmax_(lib, x, zeros_h, zeros_w), reps))
    elif kind == "gelu":  # the cheaper of PyTorch's in-place GELU and oneDNN's GELU after a product
        x = torch.randn(rows, inner).to(dtype)
        seconds = seconds_per_call(lambda: torch.ops.aten.gelu_(x), reps)
        ops = torch.ops.mkldnn
        if hasattr(ops, "_linear_pointwise") and torch.backends.mkldnn.is_available():
            a, w, b = torch.randn(rows, 16).to(dtype), torch.randn(inner, 16).to(dtype), torch.zeros(inner).to(dtype)
            plain = seconds_per_call(lambda: ops._linear_pointwise(a, w, b, "none", [], ""), reps)
            fused = seconds_per_call(lambda: ops._linear_pointwise(a, w, b, "gelu", [], "none"), reps)
            if fused > plain:  # (a difference lost in the timing's noise says nothing)
                seconds = min(seconds, fused - plain)
    else:
        x = torch.randn(rows, inner).to(dtype)
        weight, bias = torch.ones(inner).to(dtype), torch.zeros(inner).to(dtype)
        seconds = seconds_per_call(lambda: F.layer_norm(x, (inner,), weight, bias), reps)
    return seconds * values / (rows * inner)


def conv_flop(spec: tuple) -> float:
    x_shape, w_shape, stride, padding, dilation, groups = spec
    out_h = (x_shape[2] + 2 * padding[0] - dilation[0] * (w_shape[2] - 1) - 1) // stride[0] + 1
    out_w = (x_shape[3] + 2 * padding[1] - dilation[1] * (w_shape[3] - 1) - 1) // stride[1] + 1
    return 2.0 * x_shape[0] * out_h * out_w * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]


def floor(recorder: RecordProducts, dtype: torch.dtype, reps: int) -> dict:
    """Seconds and FLOP by kind of work (linear layers, convolutions, attention products)."""
    out = {"linear": [0.0, 0.0], "conv": [0.0, 0.0], "attention": [0.0, 0.0]}
    best_linear_rate = 0.0
    for (rows, k, n), calls in recorder.linear.items():
        flop = 2.0 * rows * k * n
        seconds = linear_seconds(rows, k, n, dtype, reps)
        best_linear_rate = max(best_linear_rate, flop / seconds)
        out["linear"][0] += calls * seconds
        out["linear"][1] += calls * flop
    for spec, calls in recorder.conv.items():
        flop = conv_flop(spec)
        seconds = conv_seconds(spec, dtype, reps)
        if spec[5] == 1 and spec[1][2:] == (1, 1) and best_linear_rate:  # a 1x1 convolution is a product
            seconds = min(seconds, flop / best_linear_rate)
        out["conv"][0] += calls * seconds
        out["conv"][1] += calls * flop
    for (batch, m, k, n), calls in recorder.bmm.items():
        flop = 2.0 * batch * m * k * n
        seconds = bmm_seconds(batch, m, k, n, dtype, reps)
        if best_linear_rate:
            seconds = min(seconds, flop / best_linear_rate)
        out["attention"][0] += calls * seconds
        out["attention"][1] += calls * flop
    return out


def elementwise_floor(recorder: RecordProducts, dtype: torch.dtype, reps: int) -> dict[str, tuple[float, int]]:
    """Seconds and values of each kind of element-wise work (GELU, softmax, layer norm)."""
    out: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for (kind, inner), values in recorder.elementwise.items():
        out[kind][0] += elementwise_seconds(kind, inner, values, dtype, reps)
        out[kind][1] += values
    return {kind: (seconds, values) for kind, (seconds, values) in out.items()}


def targets(peers: dict, model: str) -> dict:
    """Issue 26's targets from bench_peers.py's samples: OpenVINO bf16 / 1.25, OpenVINO f32 / 1.2 (medians)."""
    samples = peers.get(model, {}).get("samples", {})
    found = {}
    for backend, ratio, kind in (("ov-bf16", 1.25, "bfloat16"), ("ov-f32", 1.2, "float32")):
        encoder = samples.get(backend, {}).get("encoder")
        if encoder:
            found[kind] = (statistics.median(encoder) / ratio, backend, statistics.median(encoder))
    for backend, kind in (("segany-fast", "bfloat16"), ("segany-exact", "float32")):
        encoder = samples.get(backend, {}).get("encoder")
        if encoder and kind in found:
            found[kind] = (*found[kind], statistics.median(encoder))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_b,vit_t", help="comma-separated: vit_b, vit_l, vit_h, vit_t")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peers", type=Path, help="bench_peers.py --json output: compare the floor with issue 26's targets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers = json.loads(args.peers.read_text()) if args.peers else {}
    print(f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, {args.threads} thread(s), {SIZE}x{SIZE}")
    for model in args.models.split(","):
        recorder = record(model)
        print(f"\n**{model}** ({sum(recorder.linear.values())} linear products, {sum(recorder.conv.values())} convolutions,"
              f" {sum(recorder.bmm.values())} attention products)\n")
        print("| dtype | linear layers | convolutions | attention products | products alone (floor) "
              "| GELU, softmax, layer norm | products and element-wise (floor) | target (issue 26) | segany now |")
        print("|---|---|---|---|---|---|---|---|---|")
        goals = targets(peers, model)
        for dtype, kind in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
            parts = floor(recorder, dtype, args.reps)
            total = sum(s for s, _ in parts.values())
            cells = [f"{s:.3f} s ({f / 1e9:.1f} GFLOP, {f / s / 1e9:.0f} GFLOP/s)" for s, f in parts.values()]
            extra = elementwise_floor(recorder, dtype, args.reps)
            extra_s = sum(s for s, _ in extra.values())
            extra_cell = f"{extra_s:.3f} s (" + ", ".join(f"{k} {v / 1e6:.0f}M values {s:.3f} s" for k, (s, v) in extra.items()) + ")"
            goal = goals.get(kind)
            target = f"{goal[0]:.3f} s ({goal[1]} {goal[2]:.3f} s / {1.25 if kind == 'bfloat16' else 1.2})" if goal else "-"
            now = f"{goal[3]:.3f} s" if goal and len(goal) > 3 else "-"
            print(f"| {kind} | {' | '.join(cells)} | **{total:.3f} s** | {extra_cell} | **{total + extra_s:.3f} s** | {target} | {now} |")


if __name__ == "__main__":
    main()
