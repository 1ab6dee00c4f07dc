"""Prototype (not wired into segany): MobileSAM's convolution side with its GELUs and residual adds fused
into the convolutions, as OpenVINO runs it, against segany's fast mode today. Benchmark only.

    python3 benchmarks/proto_tinyvit_convs.py [--weights PATH] [--reps 5] [--threads 2]

The part measured is TinyViT's stem (patch_embed) and first stage (layers.0: two MBConv blocks and the
patch merging), which run on the largest maps (256x256 and 128x128): segany fast runs each as a
convolution (BatchNorm folded) and then a separate GELU pass, and the residual add as another pass.
The prototype folds each BatchNorm into its convolution once, reads the weights by their released
names, and calls oneDNN's convolution with the GELU (or the MBConv's residual add) as a post-op: one
pass over each output instead of two (the MBConv's last GELU, after the add, stays a separate pass:
PyTorch's oneDNN binary op takes no GELU after the add). Same bfloat16 channels-last input, outputs
compared (relative L2).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402

import peers_backends as pb  # noqa: E402

conv_pw = torch.ops.mkldnn._convolution_pointwise


class FusedConvs:
    """TinyViT's stem and stage 0 from a released state dict, BatchNorms folded once, GELU/add as post-ops."""

    def __init__(self, state: dict, dtype=torch.bfloat16, prefix="image_encoder."):
        self.state, self.dtype, self.prefix = state, dtype, prefix
        self.convs = {}

    def folded(self, name: str):
        """(weight, bias) of `name` (a released ConvBN: name.c, name.bn) with the BatchNorm folded in."""
        if name not in self.convs:
            s = {k[len(self.prefix + name) + 1 :]: v.float() for k, v in self.state.items()
                 if k.startswith(self.prefix + name + ".")}
            scale = s["bn.weight"] * torch.rsqrt(s["bn.running_var"] + 1e-5)
            weight = (s["c.weight"] * scale.view(-1, 1, 1, 1)).to(self.dtype)
            bias = (s["bn.bias"] - s["bn.running_mean"] * scale).to(self.dtype)
            self.convs[name] = (weight.contiguous(memory_format=torch.channels_last), bias)
        return self.convs[name]

    def conv(self, x, name, stride=1, activation="none", residual=None):
        w, b = self.folded(name)
        pad = w.shape[-1] // 2
        groups = x.shape[1] if w.shape[1] == 1 and x.shape[1] > 1 else 1
        args = ([pad, pad], [stride, stride], [1, 1], groups)
        if residual is not None:  # conv(x) + residual as one post-op; oneDNN's binary op takes no GELU after it
            y = conv_pw.binary(x, residual, w, b, *args, "add", None, None, [], None)
            return torch.nn.functional.gelu(y) if activation == "gelu" else y
        return conv_pw(x, w, b, *args, activation, [], "none")

    def __call__(self, x):  # (1, 3, 1024, 1024) channels-last -> stage 0's output
        x = self.conv(x, "patch_embed.seq.0", 2, "gelu")
        x = self.conv(x, "patch_embed.seq.2", 2)
        for i in range(2):
            p = f"layers.0.blocks.{i}"
            y = self.conv(x, f"{p}.conv1", 1, "gelu")
            y = self.conv(y, f"{p}.conv2", 1, "gelu")
            x = self.conv(y, f"{p}.conv3", 1, "gelu", residual=x)
        x = self.conv(x, "layers.0.downsample.conv1", 1, "gelu")
        x = self.conv(x, "layers.0.downsample.conv2", 2, "gelu")
        return self.conv(x, "layers.0.downsample.conv3", 1)


def median_time(fn, x, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, default=None, help="a vit_t state dict (default: seeded random)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import segany

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or pb.prepare(Path(tmp), "vit_t", onnx=False, int8=False)["weights"]
        state = torch.load(weights, map_location="cpu")
        encoder = segany.load_model(weights, mode="fast").image_encoder
    fused = FusedConvs(state)

    def today(x):
        return encoder.layers[0](encoder.patch_embed(x))

    x = torch.randn(1, 3, 1024, 1024).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a, b = today(x).float(), fused(x).float()
        error = ((a - b).norm() / a.norm()).item()
        # interleaved: today, prototype, today, ...
        t_today, t_fused = [], []
        for _ in range(args.reps):
            t_today.append(median_time(today, x, 1))
            t_fused.append(median_time(fused, x, 1))
    t_today, t_fused = statistics.median(t_today), statistics.median(t_fused)
    print(f"vit_t stem + stage 0, bfloat16, {args.threads} threads, median of {args.reps} interleaved calls:")
    print(f"  segany fast today: {t_today * 1000:.1f} ms")
    print(f"  fused post-ops:    {t_fused * 1000:.1f} ms ({t_today / t_fused:.2f}x)")
    print(f"  outputs' relative L2 difference: {error:.2e}")


if __name__ == "__main__":
    main()
