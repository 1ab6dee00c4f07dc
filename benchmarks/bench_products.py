"""What this CPU's matrix products allow: bfloat16, float32 and int8 rates on the shapes of a
transformer's layers, and the time the products alone need for CLIP ViT-B/32 over N crops and for SAM's
ViT-B encoder at 1024x1024.

    python3 benchmarks/bench_products.py                 # PyTorch's thread count
    python3 benchmarks/bench_products.py --threads 1 2

A floor, not a forecast: it counts only the products of the linear layers (qkv, attention output,
MLP) and the attention's own products, each at the rate measured for its shape here, and assumes
everything else (quantising activations, layer norms, softmax, crops) is free. The int8 rate is
torch._int_mm (int8 x int8 -> int32, oneDNN/VNNI) with nothing around it; a real int8 model also
quantises every activation and rescales every output. Wall-clock medians of --reps samples after
warm-up; run it on an idle machine (the load average is printed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# (rows, in, out) per layer kind; the rows are a batch of tokens.
CLIP_B32_TOKENS = 50  # 7x7 patches + class token at 224x224
CLIP_LAYERS = 12
VIT_B_TOKENS = 64 * 64
VIT_B_LAYERS = 12


def rate(fn, flop: float, reps: int) -> float:
    """FLOP (or integer OP) per second: median over reps samples of 5 calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(5):
            fn()
        samples.append(5 * flop / (time.perf_counter() - start))
    return statistics.median(samples)


def product_rates(rows: int, k: int, n: int, reps: int) -> dict[str, float]:
    x32, w32 = torch.randn(rows, k), torch.randn(n, k)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    x8 = torch.randint(-127, 128, (rows, k), dtype=torch.int8)
    w8 = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    flop = 2.0 * rows * k * n
    return {
        "bfloat16": rate(lambda: torch.nn.functional.linear(x16, w16), flop, reps),
        "float32": rate(lambda: torch.nn.functional.linear(x32, w32), flop, reps),
        "int8": rate(lambda: torch._int_mm(x8, w8), flop, reps),
    }


def floor_seconds(layers: dict[str, tuple[int, int, int, float]], rates: dict[str, dict[str, float]], kind: str) -> float:
    """Seconds of products: sum over layer kinds of (FLOP x count) / that shape's rate."""
    return sum(2.0 * rows * k * n * count / rates[name][kind] for name, (rows, k, n, count) in layers.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[torch.get_num_threads()])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--crops", type=int, default=100, help="CLIP crops (text selection's candidates)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}, {os.cpu_count()} CPUs")

    rows = CLIP_B32_TOKENS * args.crops
    clip_layers = {  # name: (rows, in, out, count)
        "qkv 768->2304": (rows, 768, 2304, CLIP_LAYERS),
        "out 768->768": (rows, 768, 768, CLIP_LAYERS),
        "fc1 768->3072": (rows, 768, 3072, CLIP_LAYERS),
        "fc2 3072->768": (rows, 3072, 768, CLIP_LAYERS),
    }
    vit_layers = {
        "qkv 768->2304": (VIT_B_TOKENS, 768, 2304, VIT_B_LAYERS),
        "out 768->768": (VIT_B_TOKENS, 768, 768, VIT_B_LAYERS),
        "fc1 768->3072": (VIT_B_TOKENS, 768, 3072, VIT_B_LAYERS),
        "fc2 3072->768": (VIT_B_TOKENS, 3072, 768, VIT_B_LAYERS),
    }
    # SAM ViT-B's attention products: 4 global blocks (2, 5, 8, 11: 4096 x 4096 per head, QK^T and AV)
    # and 8 windowed ones (25 windows of 14x14 after padding 64 -> 70), 12 heads of 64 channels.
    # (benchmarks/bench_floor.py counts every encoder's products from its definition instead.)
    vit_attention_flop = 4 * 2 * (2.0 * VIT_B_TOKENS * VIT_B_TOKENS * 768) + 8 * 2 * (2.0 * 25 * 196 * 196 * 768)

    for threads in args.threads:
        torch.set_num_threads(threads)
        shapes = [(name, spec[:3]) for name, spec in [*clip_layers.items(), *vit_layers.items()]]
        rates: dict[str, dict[str, float]] = {}
        print(f"\n{threads} thread(s)")
        print(f"| product | rows | bfloat16 GFLOP/s | float32 GFLOP/s | int8 GOP/s |")
        print("|---|---|---|---|---|")
        for name, (r, k, n) in shapes:
            key = f"{name} x{r}"
            if key not in rates:
                rates[key] = product_rates(r, k, n, args.reps)
                got = rates[key]
                print(f"| {name} | {r} | {got['bfloat16'] / 1e9:.0f} | {got['float32'] / 1e9:.0f} | {got['int8'] / 1e9:.0f} |")
        clip_by_key = {name: rates[f"{name} x{spec[0]}"] for name, spec in clip_layers.items()}
        vit_by_key = {name: rates[f"{name} x{spec[0]}"] for name, spec in vit_layers.items()}
        clip_flop = sum(2.0 * r * k * n * c for r, k, n, c in clip_layers.values())
        print(f"CLIP ViT-B/32 image tower, {args.crops} crops: {clip_flop / 1e9:.0f} GFLOP in its linear layers;"
              " products alone at these rates: "
              + ", ".join(f"{kind} {floor_seconds(clip_layers, clip_by_key, kind):.2f} s" for kind in ("bfloat16", "int8", "float32")))
        vit_flop = sum(2.0 * r * k * n * c for r, k, n, c in vit_layers.values()) + vit_attention_flop
        attention_s = vit_attention_flop / statistics.mean(v["bfloat16"] for v in vit_by_key.values())
        print(f"SAM ViT-B encoder at 1024x1024: {vit_flop / 1e9:.0f} GFLOP in linear layers and attention;"
              f" bfloat16 products alone {floor_seconds(vit_layers, vit_by_key, 'bfloat16') + attention_s:.2f} s"
              " (attention at the linear layers' mean bfloat16 rate)")


if __name__ == "__main__":
    main()
