"""The Swin Transformer backbone (Liu et al., 2021) as Semantic-SAM uses it: hierarchical stages of
(shifted-)window self-attention with a relative position bias, joined by patch merging; each stage's
output is normalised and returned as res2..res5 (strides 4, 8, 16, 32)."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import SwinConfig


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of w -> (B * H/w * W/w, w*w, C), windows in row-major order."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_merge(windows: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """The inverse of window_partition: (B * nW, w*w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, wd, c)


def relative_position_index(w: int) -> torch.Tensor:
    """(w*w, w*w): for every pair of positions in a window, the row of their offset in the bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # 2, w*w
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # w*w, w*w, 2 in [0, 2w-2]
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def shift_mask(h: int, wd: int, w: int, shift: int) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask for shifted windows: 0 within a region of the rolled image, -100 across.

    The padded image is cut into 3x3 regions by the lines at -w and -shift from the bottom/right edge;
    after the cyclic shift, a window may hold pixels of several regions, which must not attend to each other.
    """
    region = torch.zeros(1, h, wd, 1)
    cuts = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            region[:, rows, cols, :] = label
            label += 1
    windows = window_partition(region, w).squeeze(-1)  # nW, w*w
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned bias per relative offset and head."""

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Stored in the released checkpoints; the loader checks it equals this construction.
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: (B*nW, N=w*w, C); mask: (nW, N, N) or None
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # B*nW, nH, N, N
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window_size = window_size
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, wd: int, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, H*W, C)
        b, _, c = x.shape
        w = self.window_size
        y = self.norm1(x).view(b, h, wd, c)
        # Zero-pad bottom/right to whole windows; the padded tokens take part in the attention (as released).
        y = F.pad(y, (0, 0, 0, (w - wd % w) % w, 0, (w - h % w) % w))
        hp, wp = y.shape[1], y.shape[2]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, w), mask if self.shift else None)
        y = window_merge(y, w, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :wd, :].reshape(b, h * wd, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods concatenated (4C), normalised and projected to 2C: half the resolution."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, wd: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, wd, c)
        x = F.pad(x, (0, 0, 0, wd % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    """`depth` blocks alternating plain and shifted windows, then (except the last stage) patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float, merge: bool):
        super().__init__()
        self.window_size = window_size
        self.shift = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor, h: int, wd: int) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """-> (stage output, input of the next stage, its height, its width)."""
        w = self.window_size
        mask = shift_mask(-(-h // w) * w, -(-wd // w) * w, w, self.shift).to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, h, wd, mask)
        if self.downsample is None:
            return x, x, h, wd
        return x, self.downsample(x, h, wd), (h + 1) // 2, (wd + 1) // 2


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        h, wd = x.shape[-2:]
        x = self.proj(F.pad(x, (0, (p - wd % p) % p, 0, (p - h % p) % p)))  # B, C, H/p, W/p
        return x


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        channels = cfg.channels
        n = len(cfg.depths)
        self.layers = nn.ModuleList(
            SwinStage(channels[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, i < n - 1)
            for i in range(n)
        )
        for i, c in enumerate(channels):
            self.add_module(f"norm{i}", nn.LayerNorm(c))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised image -> {"res2": (B, C, H/4, W/4), ..., "res5": (B, 8C, H/32, W/32)}."""
        x = self.patch_embed(x)  # B, C, H/4, W/4
        b, c, h, wd = x.shape
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))  # B, H*W, C
        out: Dict[str, torch.Tensor] = {}
        for i, stage in enumerate(self.layers):
            y, x, nh, nw = stage(x, h, wd)
            y = getattr(self, f"norm{i}")(y)
            out[f"res{i + 2}"] = y.view(b, h, wd, -1).permute(0, 3, 1, 2).contiguous()
            h, wd = nh, nw
        return out
