"""The ViT image encoder at inference: attention without a materialised bias, windows cut in one copy,
projections with their residual fused (see docs/architecture.md). Twins of segany.modeling.image_encoder's
modules: same parameters, same step names."""
from __future__ import annotations

import ctypes
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .rel_pos_softmax import DTYPES, FUSED_HEAD_DIMS, QkvLayout, attention_rows, rel_pos_softmax_, rel_pos_tables  # noqa: I001
from ..modeling import image_encoder as plain
from ..modeling.image_encoder import (
    decomposed_rel_pos_bias,
    decomposed_rel_pos_terms,
    relative_position_table,
)
from .cache import kept_until_changed
from .kernels import linear
from .twin import UNBOUND, chosen_at_build, register


class Attention(plain.Attention):
    """Multi-head self-attention with optional decomposed relative-position bias."""

    paths = UNBOUND
    # On a CPU in chunks and bands with the compiled kernels where they loaded; elsewhere one fused
    # kernel (see rel_pos_attention_fused).
    rel_pos_attention = chosen_at_build(
        lambda _, paths: functools.partial(rel_pos_attention_chunked, kernels=paths.attention_kernels)
        if paths.cpu
        else rel_pos_attention_fused
    )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mix(x))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's output before the output projection: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        if self.takes_rows(x):
            out = self.attend_rows(x, torch.arange(b * h * w, device=x.device).view(b, h * w), (h, w))
            if out is not None:
                return out
        q, k, v = self.heads(x)  # each B*heads, H*W, head_dim
        if not self.use_rel_pos:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # The bias is never materialised whole (a global block's is 800 MB for vit_b, 1 GB for
            # vit_h); see rel_pos_attention_chunked.
            x = self.rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
        return x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)

    def mix_windowed(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """mix() within non-overlapping windows, x zero-padded to whole windows (inference).

        Equal to window_unpartition(mix(window_partition(x))) as released, with fewer passes: the qkv
        projection runs on the unpadded positions only (a zero-padded position's q, k and v are the qkv
        bias); with the compiled kernels the attention reads the windows from the projection's rows and
        writes to the image's rows (attend_rows), otherwise one copy cuts the windows and splits the
        heads, and one copy puts the output back in image order without the padding.
        (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        ws, heads = window_size, self.num_heads
        if self.takes_rows(x):
            out = self.attend_rows(x, window_index(b, h, w, ws, x.device), (ws, ws))
            if out is not None:
                return out
        n_h, n_w = -(-h // ws), -(-w // ws)
        product = self.paths.linear(x, self.qkv.weight, self.qkv.bias).view(b, h, w, 3, heads, -1)
        head_dim = product.shape[-1]
        windows = product.new_empty(3, b, n_h, n_w, heads, ws, ws, head_dim)
        grid = windows.permute(0, 1, 2, 5, 3, 6, 4, 7)  # 3, B, n_h, ws (y), n_w, ws (x), heads, head_dim
        for (y0, y1, iy, ny, ry), (x0, x1, ix, nx, rx) in window_regions(h, w, ws):
            src = product[:, y0:y1, x0:x1].view(b, ny, ry, nx, rx, 3, heads, head_dim).permute(5, 0, 1, 2, 3, 4, 6, 7)
            grid[:, :, iy : iy + ny, :ry, ix : ix + nx, :rx].copy_(src)
        for padding in (grid[:, :, -1:, h - (n_h - 1) * ws :], grid[:, :, :, :, -1:, w - (n_w - 1) * ws :]):
            if padding.numel() and self.qkv.bias is None:
                padding.zero_()
            elif padding.numel():
                padding.copy_(self.qkv.bias.view(3, 1, 1, 1, 1, 1, heads, head_dim).expand(padding.shape))
        q, k, v = windows.view(3, b * n_h * n_w * heads, ws * ws, head_dim).unbind(0)
        if self.use_rel_pos:
            mixed = self.rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (ws, ws), self.scale)
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        mixed = mixed.view(b, n_h, n_w, heads, ws, ws, head_dim)
        out = x.new_empty(b, h, w, heads, head_dim)
        for (y0, y1, iy, ny, ry), (x0, x1, ix, nx, rx) in window_regions(h, w, ws):
            region = mixed[:, iy : iy + ny, ix : ix + nx, :, :ry, :rx].permute(0, 1, 4, 2, 5, 3, 6)
            out[:, y0:y1, x0:x1].view(b, ny, ry, nx, rx, heads, head_dim).copy_(region)
        return out.view(b, h, w, c)

    def takes_rows(self, x: torch.Tensor) -> bool:
        """Whether attend_rows runs: on a CPU build with the compiled kernels (paths.attention_kernels; a
        build for another device has none), every window and head in one call, q, k, v read from the qkv
        projection's rows and the output written to the image's rows (rel_pos_softmax.attention_rows)."""
        return (
            self.paths.attention_kernels is not None
            and x.dtype in DTYPES
            and self.qkv.weight.dtype == x.dtype
            and self.qkv.out_features // (3 * self.num_heads) in FUSED_HEAD_DIMS
        )

    def attend_rows(self, x: torch.Tensor, index: torch.Tensor, size: Tuple[int, int]) -> Optional[torch.Tensor]:
        """mix() through the compiled kernel: windows (or whole images) given by `index` (windows, n) of
        rows of x, -1 for the zero padding, whose q, k, v are the qkv bias; None where it declines."""
        b, h, w, c = x.shape
        heads = self.num_heads
        product = self.paths.linear(x, self.qkv.weight, self.qkv.bias)  # B, H, W, 3C: q | k | v
        width = product.shape[-1]
        pad = self.qkv.bias if self.qkv.bias is not None else product.new_zeros(width)
        out = x.new_empty(b, h, w, c)
        rel_pos = (self.rel_pos_h, self.rel_pos_w, size) if self.use_rel_pos else None
        done = attention_rows(
            self.paths.attention_kernels, product.reshape(b * h * w, width), pad.contiguous(), index, heads,
            QkvLayout.sam(heads, width // (3 * heads)), self.scale, out.view(b * h * w, c), rel_pos=rel_pos,
            packed_tables=self.packed_tables(size, product.dtype) if rel_pos is not None else None,
        )
        return out if done else None

    def packed_tables(self, size: Tuple[int, int], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The rel-pos tables gathered for a size x size grid and packed for the kernel, kept until the
        tables change (a block always sees one grid: its windows' or the image's)."""
        return kept_until_changed(
            self, f"_segany_rows_tables_{size[0]}x{size[1]}_{dtype}", [self.rel_pos_h, self.rel_pos_w],
            lambda: rel_pos_tables(self.rel_pos_h, self.rel_pos_w, size, dtype),
        )

    def heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, each (B*heads, H*W, head_dim), from x (B, H, W, C)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).view(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # a copy that gives each head its own contiguous block (the products then read it directly)
        return qkv.contiguous().view(3, b * self.num_heads, h * w, -1).unbind(0)


# Logits of windowed attention computed at once (4 MB in float32: they stay in cache).
WINDOW_CHUNK_ELEMENTS = 1 << 20


def rel_pos_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: Tuple[int, int],
    scale: float,
    kernels: Optional[ctypes.CDLL] = None,
) -> torch.Tensor:
    """Attention with the decomposed rel-pos bias (inference). q, k, v: (BH, N, C); kernels: the
    compiled attention kernels the engine bound (segany.engine.rel_pos_softmax), or None.

    Small (windowed) attention: a chunk of windows x heads at a time, their logits in float32 with the
    bias added in place as its two broadcast factors (rel_h over key rows, rel_w over key columns),
    softmax in float32, then the product with v: faster than the fused kernel with the bias
    materialised as its mask, and closer to float32 in bfloat16 (docs/benchmarks.md).
    Large (global) attention: the same in row bands of one head at a time (rel_pos_attention_banded).
    """
    bh, n, _ = q.shape
    if n >= GLOBAL_ROWS:
        return rel_pos_attention_banded(q, k, v, rel_pos_h, rel_pos_w, size, scale, kernels)
    h, w = size
    step = max(1, WINDOW_CHUNK_ELEMENTS // (n * n))
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    tables = relative_position_table(h, h, rel_pos_h), relative_position_table(w, w, rel_pos_w)
    for start in range(0, bh, step):
        part = slice(start, min(bh, start + step))
        rel_h, rel_w = decomposed_rel_pos_terms(q[part], rel_pos_h, rel_pos_w, size, size, tables)
        rel_h = rel_h.float().reshape(-1, n, h, 1)
        rel_w = rel_w.float().reshape(-1, n, 1, w)
        attend_with_rel_pos(q[part], k[part], v[part], rel_h, rel_w, scale, out[part], kernels)
    return out


def rel_pos_attention_fused(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: Tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """rel_pos_attention_chunked for a GPU: one fused kernel over every window and head is what is fast
    there (the chunks and bands are for a CPU's caches), the bias materialised as its additive mask."""
    bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, size, size).to(q.dtype)
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias[None], scale=scale)[0]


def attend_with_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    kernels: Optional[ctypes.CDLL] = None,
) -> None:
    """out = softmax((q * scale) k^T + rel_h + rel_w) v for q (..., Nq, C), k, v (..., N, C), the keys
    on a (k_h, k_w) grid: rel_h (..., Nq, k_h, 1) and rel_w (..., Nq, 1, k_w) float32, added in place
    onto float32 logits (whatever q's dtype), softmax in float32, the products in q's dtype.
    One head (2-D q, k, v): both products through kernels.linear (v^T as the weight)."""
    if q.dim() == 2:
        logits = linear(q * scale, k)  # Nq, N (q scaled first, as released)
    else:
        logits = torch.matmul(q * scale, k.transpose(-2, -1))
    if kernels is None or not rel_pos_softmax_(kernels, logits, rel_h, rel_w):  # bias and softmax in one pass
        logits = logits.float()
        logits.view(*logits.shape[:-1], rel_h.shape[-2], rel_w.shape[-1]).add_(rel_h).add_(rel_w)
        logits = logits.softmax(-1)
    probs = logits.to(v.dtype)
    if q.dim() == 2:
        out.copy_(linear(probs, v.t()))
    else:
        torch.matmul(probs, v, out=out)


# Attention over at least this many positions runs in row bands (rel_pos_attention_banded).
GLOBAL_ROWS = 1024
# Query rows per band: a band's logits are rows x N float32 (8 MB at N = 4096).
BAND_ROWS = 512


def rel_pos_attention_banded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    size: Tuple[int, int],
    scale: float,
    kernels: Optional[ctypes.CDLL] = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + rel_h + rel_w) v, one head and one band of query rows at a time.

    The logits, the bias and the softmax are float32 whatever the inputs' dtype (bfloat16 in fast mode:
    only the two products run in it)."""
    bh, n, _ = q.shape
    k_h, k_w = size
    rel_h, rel_w = decomposed_rel_pos_terms(q.float(), rel_pos_h.float(), rel_pos_w.float(), size, size)
    rel_h = rel_h.reshape(bh, n, k_h, 1)
    rel_w = rel_w.reshape(bh, n, 1, k_w)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    for b in range(bh):
        for r0 in range(0, n, BAND_ROWS):
            rows = slice(r0, min(n, r0 + BAND_ROWS))
            attend_with_rel_pos(q[b, rows], k[b], v[b], rel_h[b, rows], rel_w[b, rows], scale, out[b, rows], kernels)
    return out


def window_regions(h: int, w: int, window_size: int):
    """The image split into at most 4 regions of windows: whole windows, and the partial last row and
    column of windows. Yields ((y0, y1, first window row, window rows, rows per window), (same for x))."""

    def spans(size: int):
        whole = size // window_size
        if whole:
            yield 0, whole * window_size, 0, whole, window_size
        if size % window_size:
            yield whole * window_size, size, whole, 1, size % window_size

    for y_span in spans(h):
        for x_span in spans(w):
            yield y_span, x_span


@functools.lru_cache(maxsize=16)
def window_index(b: int, h: int, w: int, window: int, device: torch.device) -> torch.Tensor:
    """(windows, window * window) int64: the row (in B*H*W order) of each position of each window of a
    (B, H, W) map cut into windows from its top-left corner, -1 where a window runs into the padding;
    windows in (B, rows of windows, columns of windows) order, as window_partition makes them."""
    n_h, n_w = -(-h // window), -(-w // window)
    y = torch.arange(n_h * window, device=device).view(n_h, window, 1, 1)  # window row, row within it
    x = torch.arange(n_w * window, device=device).view(1, 1, n_w, window)
    inside = (y < h) & (x < w)
    rows = torch.where(inside, y * w + x, torch.full((), -1, device=device))  # n_h, ws, n_w, ws
    rows = rows.permute(0, 2, 1, 3).reshape(1, n_h * n_w, window * window)
    image = torch.arange(b, device=device).view(b, 1, 1) * (h * w)
    return torch.where(rows >= 0, rows + image, rows).reshape(b * n_h * n_w, window * window).contiguous()


class Block(plain.Block):
    """Pre-norm transformer block; window_size 0 means global attention."""

    paths = UNBOUND

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            x = self.attn.mix_windowed(x, self.window_size)
        else:
            x = self.attn.mix(x)
        # The output projection acts on each position alone: applied after un-partitioning it skips
        # the padding positions, and the residual is added as it is computed.
        proj = self.attn.proj
        x = self.paths.linear(x, proj.weight, proj.bias, residual=shortcut)
        return self.mlp(self.norm2(x), residual=x)


register(plain.Attention, Attention)
register(plain.Block, Block)
