"""ViT image encoder (MAE-pretrained ViT-B/L/H in the released models).

16x16 patches -> absolute position embedding -> transformer blocks with windowed attention
(window 14, decomposed relative positions) and a few global blocks -> neck to 256 x 64 x 64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock
from .kernels import Linear, is_exporting, linear


@dataclass
class ImageEncoderConfig:
    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: Tuple[int, ...] = field(default_factory=lambda: (2, 5, 8, 11))


class PatchEmbed(nn.Module):
    """Image to patch embeddings; output is channels-last (B, H/16, W/16, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Gather the (q_size, k_size, C) relative-position embeddings from a (2*S-1, C) table.

    The table is linearly resampled when it was trained for another size, as in the release.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
    tables: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of MViTv2's decomposed relative-position bias.

    q: (B*heads, q_h*q_w, C), unscaled. Returns rel_h (B*heads, q_h, q_w, k_h) and
    rel_w (B*heads, q_h, q_w, k_w); the bias of query (i, j) on key (y, x) is rel_h[i, j, y] + rel_w[i, j, x].
    tables: the two relative_position_table()s, when the caller already has them.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    if tables is None:
        tables = relative_position_table(q_h, k_h, rel_pos_h), relative_position_table(q_w, k_w, rel_pos_w)
    table_h, table_w = tables  # (q_h, k_h, C), (q_w, k_w, C)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, table_h)  # b, q_h, q_w, k_h
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, table_w)  # b, q_h, q_w, k_w
    # einsum returns these with permuted strides; contiguous (small) factors make the bias built from
    # them contiguous too, instead of a strided N x N tensor that reshaping copies once more
    return rel_h.contiguous(), rel_w.contiguous()


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> torch.Tensor:
    """Additive attention bias of MViTv2's decomposed relative positions, materialised.

    q: (B*heads, q_h*q_w, C), unscaled. Returns (B*heads, q_h*q_w, k_h*k_w).
    """
    rel_h, rel_w = decomposed_rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    bias = rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    b, q_h, q_w, k_h, k_w = bias.shape
    return bias.reshape(b, q_h * q_w, k_h * k_w)


class Attention(nn.Module):
    """Multi-head self-attention with optional decomposed relative-position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            assert input_size is not None, "relative positions need the attention input size"
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.mix(x))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The attention's output before the output projection: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, _ = x.shape
        q, k, v = self.heads(x)  # each B*heads, H*W, head_dim
        if not self.use_rel_pos:
            x = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif (torch.is_grad_enabled() and (q.requires_grad or self.rel_pos_h.requires_grad)) or is_exporting():
            # Training (and export): fused attention with the materialised bias as the additive mask
            # (4-D, so the fused kernels apply); differentiable and one graph node.
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            x = F.scaled_dot_product_attention(
                *(t.view(b, self.num_heads, h * w, -1) for t in (q, k, v)),
                attn_mask=bias.view(b, self.num_heads, h * w, h * w),
                scale=self.scale,
            )
        else:
            # Inference (nothing to differentiate): the bias is never materialised whole (a global
            # block's is 800 MB for vit_b, 1 GB for vit_h); see rel_pos_attention_chunked.
            x = rel_pos_attention_chunked(q, k, v, self.rel_pos_h, self.rel_pos_w, (h, w), self.scale)
        return x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)

    def mix_windowed(self, x: torch.Tensor, window_size: int) -> torch.Tensor:
        """mix() within non-overlapping windows, x zero-padded to whole windows (inference).

        Equal to window_unpartition(mix(window_partition(x))) as released, with fewer passes: the qkv
        projection runs on the unpadded positions only (a zero-padded position's q, k and v are the qkv
        bias), one copy cuts the windows and splits the heads, and one copy puts the output back in
        image order without the padding. (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        ws, heads = window_size, self.num_heads
        n_h, n_w = -(-h // ws), -(-w // ws)
        product = linear(x, self.qkv.weight, self.qkv.bias).view(b, h, w, 3, heads, -1)
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
            mixed = rel_pos_attention_chunked(q, k, v, self.rel_pos_h, self.rel_pos_w, (ws, ws), self.scale)
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        mixed = mixed.view(b, n_h, n_w, heads, ws, ws, head_dim)
        out = x.new_empty(b, h, w, heads, head_dim)
        for (y0, y1, iy, ny, ry), (x0, x1, ix, nx, rx) in window_regions(h, w, ws):
            region = mixed[:, iy : iy + ny, ix : ix + nx, :, :ry, :rx].permute(0, 1, 4, 2, 5, 3, 6)
            out[:, y0:y1, x0:x1].view(b, ny, ry, nx, rx, heads, head_dim).copy_(region)
        return out.view(b, h, w, c)

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
) -> torch.Tensor:
    """Attention with the decomposed rel-pos bias (inference). q, k, v: (BH, N, C).

    Small (windowed) attention: a chunk of windows x heads at a time, their logits in float32 with the
    bias added in place as its two broadcast factors (rel_h over key rows, rel_w over key columns),
    softmax in float32, then the product with v. Against the fused kernel with the bias materialised
    as its mask: 1.5x faster in float32 (equal up to rounding), 2.4x in bfloat16 (and half the error).
    Large (global) attention: the same in row bands of one head at a time (rel_pos_attention_banded);
    about 2x faster than the fused kernel with a materialised mask in float32, 3.5x in bfloat16.
    """
    bh, n, _ = q.shape
    if not q.is_cpu:
        # On a GPU one fused kernel over every window and head is what is fast (the chunks and bands
        # below are for a CPU's caches): the bias materialised as its additive mask, as in training.
        bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, size, size).to(q.dtype)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias[None], scale=scale)[0]
    if n >= GLOBAL_ROWS:
        return rel_pos_attention_banded(q, k, v, rel_pos_h, rel_pos_w, size, scale)
    h, w = size
    step = max(1, WINDOW_CHUNK_ELEMENTS // (n * n))
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    tables = relative_position_table(h, h, rel_pos_h), relative_position_table(w, w, rel_pos_w)
    for start in range(0, bh, step):
        part = slice(start, min(bh, start + step))
        rel_h, rel_w = decomposed_rel_pos_terms(q[part], rel_pos_h, rel_pos_w, size, size, tables)
        rel_h = rel_h.float().reshape(-1, n, h, 1)
        rel_w = rel_w.float().reshape(-1, n, 1, w)
        attend_with_rel_pos(q[part], k[part], v[part], rel_h, rel_w, scale, out[part])
    return out


def attend_with_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    """out = softmax((q * scale) k^T + rel_h + rel_w) v for q (..., Nq, C), k, v (..., N, C), the keys
    on a (k_h, k_w) grid: rel_h (..., Nq, k_h, 1) and rel_w (..., Nq, 1, k_w) float32, added in place
    onto float32 logits (whatever q's dtype), softmax in float32, the products in q's dtype.
    One head (2-D q, k, v): both products through kernels.linear (v^T as the weight)."""
    if q.dim() == 2:
        logits = linear(q * scale, k).float()  # Nq, N (q scaled first, as released)
    else:
        logits = torch.matmul(q * scale, k.transpose(-2, -1)).float()
    logits.view(*logits.shape[:-1], rel_h.shape[-2], rel_w.shape[-1]).add_(rel_h).add_(rel_w)
    probs = logits.softmax(-1).to(v.dtype)
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
            attend_with_rel_pos(q[b, rows], k[b], v[b], rel_h[b, rows], rel_w[b, rows], scale, out[b, rows])
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


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B*nW, ws, ws, C), zero-padding H and W up to multiples of ws."""
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of window_partition, dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


class Block(nn.Module):
    """Pre-norm transformer block; window_size 0 means global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        act_layer: Type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0 and not (torch.is_grad_enabled() or is_exporting()):
            x = self.attn.mix_windowed(x, self.window_size)
        elif self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
            x = window_unpartition(self.attn.mix(x), self.window_size, pad_hw, (h, w))
        else:
            x = self.attn.mix(x)
        # The output projection acts on each position alone: applied after un-partitioning it skips
        # the padding positions, and the residual is added as it is computed.
        proj = self.attn.proj
        x = linear(x, proj.weight, proj.bias, residual=shortcut)
        return self.mlp(self.norm2(x), residual=x)


class ImageEncoderViT(nn.Module):
    """(B, 3, 1024, 1024) normalised image -> (B, 256, 64, 64) embedding."""

    def __init__(self, cfg: Optional[ImageEncoderConfig] = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or ImageEncoderConfig(**overrides)
        self.config = cfg
        self.img_size = cfg.img_size
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.pos_embed: Optional[nn.Parameter] = None
        if cfg.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=cfg.embed_dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                use_rel_pos=cfg.use_rel_pos,
                window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                input_size=(grid, grid),
            )
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B, 64, 64, C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))  # B, 256, 64, 64
