"""The image encoder's attention softmax with its decomposed relative-position bias, in one pass
(segany/engine/csrc/attention_softmax.c; compiled and loaded as segany.engine.native describes).

PyTorch runs softmax(logits + rel_h + rel_w) over a band of logits as five passes through memory
(bfloat16 logits widened to float32, two broadcast adds, the softmax, the probabilities narrowed back);
the kernel reads each row once and writes its probabilities in place, in the logits' dtype, with the
same float32 arithmetic. Where it cannot run (no AVX-512 BF16 or no compiler, SEGANY_NATIVE=0, another
device or dtype, anything that needs gradients) `rel_pos_softmax_` says so and the caller keeps its
PyTorch path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..modeling.image_encoder import decomposed_rel_pos_terms
from . import native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention_softmax.c"
ABI = 1
DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None where it cannot run here (the reason is logged once)."""
    if os.environ.get(native.ENV_SWITCH, "1") == "0" or not native.cpu_has_avx512_bf16():
        return None
    compiler = native._compiler()
    if compiler is None:
        logger.info("segany attention kernel: no C compiler found; using PyTorch's operations")
        return None
    try:
        import torch  # noqa: F401,F811  (its OpenMP runtime is loaded first, and the kernel binds to it)

        lib = ctypes.CDLL(str(native._build(compiler, SOURCE)))
        p, i, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        lib.segany_attention_abi.restype = i
        lib.segany_attention_abi.argtypes = []
        lib.segany_rel_pos_softmax.restype = None
        lib.segany_rel_pos_softmax.argtypes = [p, l, l, i, i, p, p, i, i]
        lib.segany_rel_pos_attention_bf16.restype = None
        lib.segany_rel_pos_attention_bf16.argtypes = [p, p, p, p, p, p, l, l, l, i, i, i, i, i]
        if lib.segany_attention_abi() != ABI:
            raise RuntimeError("the compiled kernel does not match this version of segany")
        return lib
    except Exception as err:  # any failure: the PyTorch path is always there
        logger.warning("segany attention kernel unavailable (%s: %s); using PyTorch's operations", type(err).__name__, err)
        return None


def rel_pos_softmax_(logits: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor) -> bool:
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
        or not logits.is_cpu
        or logits.requires_grad
        or rel_h.numel() != rows * k_h
        or rel_w.numel() != rows * k_w
        or logits.stride(-1) != 1
        or not logits.is_contiguous()
        or library() is None
    ):
        return False
    rel_h = rel_h.contiguous()
    rel_w = rel_w.contiguous()
    library().segany_rel_pos_softmax(
        logits.data_ptr(), rows, n, k_h, k_w, rel_h.data_ptr(), rel_w.data_ptr(),
        int(logits.dtype == torch.bfloat16), torch.get_num_threads(),
    )
    return True


# head sizes the fused attention kernel takes (SAM's ViT-B/L: 64, ViT-H: 80)
FUSED_HEAD_DIMS = (16, 32, 48, 64, 80)


def rel_pos_attention_bf16(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, scale: float
) -> Optional[torch.Tensor]:
    """softmax((q * scale) k^T + rel_h + rel_w) v for bfloat16 q, k, v (BH, N, C) on a k_h x k_w grid of
    N = k_h * k_w positions, rel_h (BH, N, k_h) and rel_w (BH, N, k_w) float32: one kernel call over
    every head (or window x head), a tile of query rows at a time (csrc/attention_softmax.c). The
    logits are float32 sums of bfloat16 products (not rounded to bfloat16 as a separate product's
    output would be), bias and softmax in float32, probabilities rounded to bfloat16 for the product
    with v. None where the kernel cannot run it (the caller keeps its PyTorch path)."""
    bh, n, d = q.shape
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    if (
        n == 0
        or n != k_h * k_w
        or d not in FUSED_HEAD_DIMS
        or any(t.dtype != torch.bfloat16 or t.shape != q.shape or not t.is_cpu or t.requires_grad for t in (q, k, v))
        or rel_h.dtype != torch.float32
        or rel_w.dtype != torch.float32
        or rel_h.numel() != bh * n * k_h
        or rel_w.numel() != bh * n * k_w
        or library() is None
    ):
        return None
    key_blocks = -(-n // 32) * 2
    pairs = -(-n // 2)
    # k by pairs of channels within blocks of 16 keys, v by pairs of keys: the layouts vdpbf16ps reads
    # (zero keys past n where n is not a whole number of blocks)
    if n != key_blocks * 16:
        k = torch.cat([k, k.new_zeros(bh, key_blocks * 16 - n, d)], 1)
    kp = k.view(bh, key_blocks, 16, d // 2, 2).transpose(2, 3).contiguous()
    if n != pairs * 2:
        v = torch.cat([v, v.new_zeros(bh, 1, d)], 1)
    vp = v.view(bh, pairs, 2, d).transpose(2, 3).contiguous()
    q = (q * scale).contiguous()  # scaled in bfloat16 first, as released
    rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
    # written position-major (N, BH, C): merging the heads afterwards is then a view, not a copy
    out = q.new_empty(n, bh, d)
    library().segany_rel_pos_attention_bf16(
        q.data_ptr(), kp.data_ptr(), vp.data_ptr(), rel_h.data_ptr(), rel_w.data_ptr(), out.data_ptr(),
        d, bh * d, bh, n, d, k_h, k_w, torch.get_num_threads(),
    )
    return out.transpose(0, 1)


def rel_pos_attention_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: tuple,
    scale: float,
) -> Optional[torch.Tensor]:
    """Self-attention of bfloat16 q, k, v (BH, N, C) over a size = (h, w) grid with the decomposed
    rel-pos bias of the tables rel_pos_h, rel_pos_w, through rel_pos_attention_bf16 (the bias's two
    factors computed from q in float32); None where that kernel cannot run it."""
    if q.dtype != torch.bfloat16 or library() is None or q.requires_grad:
        return None
    bh, n, _ = q.shape
    rel_h, rel_w = decomposed_rel_pos_terms(q.float(), rel_pos_h.float(), rel_pos_w.float(), size, size)
    return rel_pos_attention_bf16(q, k, v, rel_h.reshape(bh, n, -1), rel_w.reshape(bh, n, -1), scale)
