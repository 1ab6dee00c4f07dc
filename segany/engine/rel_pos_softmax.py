"""The image encoders' attention kernels (segany/engine/csrc/attention_softmax.c; compiled and loaded as
segany.engine.native describes).

- attention_rows: a block's attention in one call over every window and head, SAM's ViT (with its
  decomposed relative-position bias) or TinyViT (with its learned bias), bfloat16 or float32, reading q,
  k, v from the qkv projection's rows and writing the output to the image's rows (no copies around it).
- rel_pos_softmax_: the PyTorch path's softmax with the decomposed bias in one pass. PyTorch runs
  softmax(logits + rel_h + rel_w) over a band of logits as five passes through memory (bfloat16 logits
  widened to float32, two broadcast adds, the softmax, the probabilities narrowed back); the kernel reads
  each row once and writes its probabilities in place, in the logits' dtype, with the same float32
  arithmetic.

Whether the kernels run is decided when an engine is built: a CPU build binds `library()` (None without
AVX-512 BF16 or a compiler, or with SEGANY_NATIVE=0), and the functions below take that library; where a
call's shapes or dtypes are outside what the kernels take they say so and the caller keeps its PyTorch
path.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..modeling.image_encoder import relative_position_table
from . import native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "attention_softmax.c"
ABI = 3
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
    for name in ("segany_attention_rows_bf16", "segany_attention_rows_f32"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [p, l, p, p, l, i, i, i, l, l, l, l, ctypes.c_float, p, p, p, i, i, p, l, i]
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


# head sizes the attention kernels take (SAM's ViT-B/L: 64, ViT-H: 80; TinyViT: 32)
FUSED_HEAD_DIMS = (16, 32, 48, 64, 80)


@dataclass(frozen=True)
class QkvLayout:
    """Where head h's q, k and v sit in a row of the qkv projection: at q + h * head, k + h * head,
    v + h * head (elements)."""

    q: int
    k: int
    v: int
    head: int

    @staticmethod
    def sam(heads: int, head_dim: int) -> "QkvLayout":
        """SAM's ViT: the row is q | k | v, each heads x head_dim (reshape(..., 3, heads, head_dim))."""
        return QkvLayout(0, heads * head_dim, 2 * heads * head_dim, head_dim)

    @staticmethod
    def tiny_vit(heads: int, head_dim: int) -> "QkvLayout":
        """TinyViT: per head q, k, v (view(..., heads, 3 * head_dim).split(head_dim))."""
        return QkvLayout(0, head_dim, 2 * head_dim, 3 * head_dim)


def attention_rows(
    lib: ctypes.CDLL,
    qkv: torch.Tensor,
    pad: torch.Tensor,
    index: torch.Tensor,
    heads: int,
    layout: QkvLayout,
    scale: float,
    out: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    rel_pos: Optional[Tuple[torch.Tensor, torch.Tensor, Tuple[int, int]]] = None,
    packed_tables: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> bool:
    """Attention within windows (or over whole images), read in place from the qkv projection's rows and
    written in place to the image's rows: no copies cut the windows out, split the heads or put them
    back (csrc/attention_softmax.c, one call for every window and head).

    qkv: (P, 3 * heads * d), bfloat16 or float32, one row per position of the image; pad: (3 * heads * d,)
    the qkv of a position in the zero padding; index: (windows, n) int64, each window's rows (a global
    block: one window per image, its positions), -1 for padding; out: (P, heads * d) in qkv's dtype,
    padded positions not written. The bias: `bias` (heads, n, n) float32, TinyViT's, added to the
    scaled product, or `rel_pos` = (rel_pos_h, rel_pos_w, (k_h, k_w)), SAM's decomposed relative-
    position tables with n = k_h * k_w, q scaled before the product (each as released), their packed
    form (rel_pos_tables) given as packed_tables where the caller keeps it; or none.
    bfloat16: products of bfloat16 values summed in float32, float32 logits, bias and softmax never in
    memory, probabilities rounded to bfloat16 for the product with v; float32: all in float32.
    Returns False, touching nothing, where the kernel cannot run it (the caller keeps its path)."""
    windows, n = index.shape
    rows, width = qkv.shape
    d = width // (3 * heads) if heads else 0
    k_h, k_w = rel_pos[2] if rel_pos is not None else (1, n)
    if (
        n == 0
        or windows == 0
        or d not in FUSED_HEAD_DIMS
        or width != heads * 3 * d
        or qkv.dtype not in DTYPES
        or any(t.dtype != qkv.dtype for t in (pad, out))
        or index.dtype != torch.int64
        or out.shape != (rows, heads * d)
        or pad.shape != (width,)
        or (bias is not None and (bias.dtype != torch.float32 or bias.shape != (heads, n, n)))
        or (bias is not None and rel_pos is not None)
        or k_h * k_w != n
        or (rel_pos is not None and any(t.shape[-1] != d for t in rel_pos[:2]))
        or not all(t.is_contiguous() for t in (qkv, pad, index, out))
        or qkv.device.type != "cpu"
    ):
        return False
    tables = (None, None)
    if rel_pos is not None:
        tables = packed_tables if packed_tables is not None else rel_pos_tables(*rel_pos, qkv.dtype)
    bias = bias.contiguous() if bias is not None else None
    refuse_autograd(out, qkv, pad)
    kernel = lib.segany_attention_rows_bf16 if qkv.dtype == torch.bfloat16 else lib.segany_attention_rows_f32
    kernel(
        qkv.data_ptr(), width, pad.data_ptr(), index.data_ptr(), windows, n, heads, d,
        layout.q, layout.k, layout.v, layout.head, scale,
        None if bias is None else bias.data_ptr(),
        None if tables[0] is None else tables[0].data_ptr(),
        None if tables[1] is None else tables[1].data_ptr(),
        k_h, k_w, out.data_ptr(), heads * d, torch.get_num_threads(),
    )
    return True


def refuse_autograd(out: torch.Tensor, *inputs: torch.Tensor) -> None:
    """The kernels write `out` through raw pointers, out of autograd's sight: like PyTorch's own products
    written into buffers (out=), they refuse autograd loudly, with PyTorch's error, when an input is part
    of a graph (an empty out= product of each input raises it; otherwise it does nothing)."""
    for x in inputs:
        torch.mul(x.reshape(-1)[:0], 0, out=out.reshape(-1)[:0])


def rel_pos_tables(
    rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, size: Tuple[int, int], dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's rel-pos tables gathered for a (k_h, k_w) grid of queries and keys and packed for the kernel
    in `dtype` (what attention_rows takes as packed_tables)."""
    return tuple(
        _packed_table(relative_position_table(n, n, table.detach().float()), dtype)
        for n, table in ((size[0], rel_pos_h), (size[1], rel_pos_w))
    )


def _packed_table(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A gathered rel-pos table (q_size, k_size, C), k_size padded with zeros to blocks of 16, packed for
    the kernel: bfloat16 by channel pairs (q_size, blocks, C/2, 16, 2), float32 (q_size, blocks, C, 16)."""
    q_size, k_size, c = table.shape
    blocks = -(-k_size // 16)
    padded = table.new_zeros(q_size, blocks * 16, c)
    padded[:, :k_size] = table
    if dtype == torch.bfloat16:
        return padded.to(torch.bfloat16).view(q_size, blocks, 16, c // 2, 2).transpose(2, 3).contiguous()
    return padded.view(q_size, blocks, 16, c).transpose(2, 3).contiguous()
