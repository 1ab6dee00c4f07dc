"""The image encoder's attention softmax with its decomposed relative-position bias, in one pass
(segany/engine/csrc/attention_softmax.c; compiled and loaded as segany.engine.native describes).

PyTorch runs softmax(logits + rel_h + rel_w) over a band of logits as five passes through memory
(bfloat16 logits widened to float32, two broadcast adds, the softmax, the probabilities narrowed back);
the kernel reads each row once and writes its probabilities in place, in the logits' dtype, with the
same float32 arithmetic. Whether the kernels run is decided when an engine is built: a CPU build
binds `library()` (None without AVX-512 BF16 or a compiler, or with SEGANY_NATIVE=0), and the
functions below take that library; where a call's shapes or dtypes are outside what the kernels take
they say so and the caller keeps its PyTorch path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..modeling.image_encoder import relative_position_table
from . import native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention_softmax.c"
ABI = 2
DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None where it cannot run here (the reason is logged once)."""
    return native.load(SOURCE, _declare, lambda lib: lib.segany_attention_abi() == ABI, "attention kernel")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.segany_attention_abi.restype = i
    lib.segany_attention_abi.argtypes = []
    lib.segany_rel_pos_softmax.restype = None
    lib.segany_rel_pos_softmax.argtypes = [p, l, l, i, i, p, p, i, i]
    lib.segany_rel_pos_attention_bf16.restype = None
    lib.segany_rel_pos_attention_bf16.argtypes = [p, p, p, ctypes.c_float, p, p, p, l, l, l, i, i, i, i, i]
    lib.segany_window_attention_bf16.restype = None
    lib.segany_window_attention_bf16.argtypes = [p, l, p, p, p, ctypes.c_float, p, l, l, i, i, i, i]
    lib.segany_window_attention_f32.restype = None
    lib.segany_window_attention_f32.argtypes = [p, l, p, p, p, ctypes.c_float, p, l, l, i, i, i, i]
    return lib


def rel_pos_softmax_(lib: ctypes.CDLL, logits: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> bool:
    """logits <- softmax(logits + rel_h + rel_w, -1) in place, the bias and the softmax in float32.

    logits: (..., Nq, k_h * k_w) float32 or bfloat16, rows contiguous; rel_h: (..., Nq, k_h, 1) and
    rel_w: (..., Nq, 1, k_w), float32 (query row r's bias on key (y, x) is rel_h[r, y] + rel_w[r, x]).
    Returns False, leaving everything unchanged, where the kernel cannot run it."""
    k_h, k_w = rel_h.shape[-2], rel_w.shape[-1]
    n = logits.shape[-1]
    rows = logits.numel() // n if n else 0
    if (
        rows == 0
        or n != k_h * k_w
        or logits.dtype not in DTYPES
        or rel_h.dtype != torch.float32
        or rel_w.dtype != torch.float32
        or rel_h.numel() != rows * k_h
        or rel_w.numel() != rows * k_w
        or logits.stride(-1) != 1
        or not logits.is_contiguous()
    ):
        return False
    rel_h = rel_h.contiguous()
    rel_w = rel_w.contiguous()
    lib.segany_rel_pos_softmax(
        logits.data_ptr(), rows, n, k_h, k_w, rel_h.data_ptr(), rel_w.data_ptr(),
        int(logits.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    return True


# head sizes the fused attention kernel takes (SAM's ViT-B/L: 64, ViT-H: 80)
FUSED_HEAD_DIMS = (16, 32, 48, 64, 80)


def rel_pos_attention_native(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: Tuple[int, int],
    scale: float,
) -> Optional[torch.Tensor]:
    """softmax((q * scale) k^T + bias) v with MViTv2's decomposed rel-pos bias of the tables rel_pos_h,
    rel_pos_w, for bfloat16 q, k, v (BH, N, C), queries and keys on one size = (h, w) grid: one kernel
    call over every head (or window x head), a tile of query rows at a time (csrc/attention_softmax.c).
    The bias factors (q against the gathered tables) and the logits are float32 sums of bfloat16
    products, never rounded to bfloat16 nor written to memory; bias and softmax in float32; the
    probabilities rounded to bfloat16 for the product with v. None where the kernel cannot run it (the
    caller keeps its PyTorch path). The result is (BH, N, C), stored position-major (N, BH, C)."""
    bh, n, d = q.shape
    h, w = size
    if (
        n == 0
        or n != h * w
        or d not in FUSED_HEAD_DIMS
        or any(t.dtype != torch.bfloat16 or t.shape != q.shape for t in (q, k, v))
        or rel_pos_h.shape[-1] != d
        or rel_pos_w.shape[-1] != d
    ):
        return None
    table_h = _packed_table(relative_position_table(h, h, rel_pos_h.detach().float()))
    table_w = _packed_table(relative_position_table(w, w, rel_pos_w.detach().float()))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # written position-major (N, BH, C): merging the heads afterwards is then a view, not a copy
    out = q.new_empty(n, bh, d)
    lib.segany_rel_pos_attention_bf16(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), scale, table_h.data_ptr(), table_w.data_ptr(),
        out.data_ptr(), d, bh * d, bh, n, d, h, w, torch.get_num_threads(),
    )
    return out.transpose(0, 1)


def _packed_table(table: torch.Tensor) -> torch.Tensor:
    """A gathered rel-pos table (q_size, k_size, C) in bfloat16, k_size padded with zeros to blocks of
    16 and packed by channel pairs: (q_size, blocks, C/2, 16, 2)."""
    q_size, k_size, c = table.shape
    blocks = -(-k_size // 16)
    padded = table.new_zeros(q_size, blocks * 16, c)
    padded[:, :k_size] = table
    return padded.to(torch.bfloat16).view(q_size, blocks, 16, c // 2, 2).transpose(2, 3).contiguous()


def window_attention_native(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,
    pad: torch.Tensor,
    index: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> bool:
    """TinyViT's windowed attention, out[p, h] = softmax((q k^T) * scale + bias[h]) v over the window
    of position p, for q, k, v read from the qkv projection's rows and written to the image's rows: no
    copies cut the windows out or put them back (csrc/attention_softmax.c). bfloat16 (products of
    bfloat16 values summed in float32, float32 logits, probabilities rounded to bfloat16 for the product
    with v) or float32 (all in float32).

    qkv: (P, heads * 3 * d) bfloat16 or float32, P positions of the image, head h's q, k, v at h*3d, h*3d+d, h*3d+2d;
    pad: (heads * 3 * d,) the qkv of a position in the zero padding; index: (windows, n) int64, the row of
    each window's positions, -1 for padding; bias: (heads, n, n) float32; out: (P, heads * d) in qkv's dtype,
    padded positions not written. Returns False, touching nothing, where the kernel cannot run it."""
    windows, n = index.shape
    heads = bias.shape[0]
    rows, width = qkv.shape
    d = width // (3 * heads) if heads else 0
    if (
        n == 0
        or windows == 0
        or d not in FUSED_HEAD_DIMS
        or width != heads * 3 * d
        or qkv.dtype not in DTYPES
        or any(t.dtype != qkv.dtype for t in (pad, out))
        or bias.dtype != torch.float32
        or bias.shape != (heads, n, n)
        or index.dtype != torch.int64
        or out.shape != (rows, heads * d)
        or pad.shape != (width,)
        or not all(t.is_contiguous() for t in (qkv, pad, index, bias, out))
    ):
        return False
    kernel = lib.segany_window_attention_bf16 if qkv.dtype == torch.bfloat16 else lib.segany_window_attention_f32
    kernel(
        qkv.data_ptr(), width, pad.data_ptr(), index.data_ptr(), bias.data_ptr(), scale, out.data_ptr(),
        heads * d, windows, heads, n, d, torch.get_num_threads(),
    )
    return True
