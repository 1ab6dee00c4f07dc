"""TinyViT image encoder: MobileSAM's `vit_t` (Zhang et al., 2023; TinyViT: Wu et al., 2022).

    image (B, 3, 1024, 1024)
      -> stem: two stride-2 3x3 convs                         (B, 64, 256, 256)
      -> stage 0: MBConv blocks, patch merging (stride 2)     (B, 128, 128, 128)
      -> stage 1: windowed attention blocks, merging (2)      (B, 160, 64, 64)   <- HQ-SAM's early feature
      -> stage 2: windowed attention blocks, merging (1)      (B, 320, 64, 64)
      -> stage 3: windowed attention blocks                   (B, 320, 64, 64)
      -> neck: 1x1 conv, LN, 3x3 conv, LN                     (B, 256, 64, 64)

Each attention block: attention inside non-overlapping windows with a learned bias per head and
per (|dy|, |dx|) offset, then a depthwise 3x3 conv that mixes across window borders, then an MLP.
Parameter names follow the released checkpoint (`patch_embed.seq`, `layers.i.blocks.j`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .build import ENCODER_BUILDERS
from .common import LayerNorm2d
from .config import SamConfig


@dataclass
class TinyViTConfig:
    img_size: int = 1024
    in_chans: int = 3
    embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (2, 4, 5, 10)  # stage 0 is convolutional; its entry is unused
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    # The released checkpoint keeps TinyViT's unused ImageNet classifier (norm_head, head); 0 drops it.
    num_classes: int = 1000

    @property
    def embedding_grid(self) -> int:
        return self.img_size // 16  # SAM's prompt encoder and decoder expect a 1/16 grid


class ConvBN(nn.Module):
    """Conv2d without bias followed by BatchNorm (released names: `c`, `bn`)."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        # Eval: the BatchNorm's fixed per-channel scale and shift folded into the convolution (one pass
        # over the activations instead of two; equal up to float rounding).
        conv, bn = self.c, self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = conv.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class Stem(nn.Module):
    """Two stride-2 3x3 convs: (B, 3, S, S) -> (B, C, S/4, S/4)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, C, H, W
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv to the next width, strided 3x3 depthwise conv, 1x1 conv: (B, C, H, W) -> (B, C', H/s, W/s)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def window_offsets_index(window: int) -> torch.Tensor:
    """(N, N) index of the bias for each query/key pair of a window: |dy| * window + |dx|.

    The released model numbers the offsets in order of first appearance when every pair is listed
    row-major; the first query (0, 0) meets every offset (dy, dx) in exactly this order.
    """
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Pre-norm multi-head attention over the tokens of one window, plus a learned offset bias."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # per head: [q | k | v]
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("bias_index", window_offsets_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B*nW, N, C
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each B*nW, heads, N, head_dim
        bias = self.attention_biases[:, self.bias_index]  # heads, N, N
        attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1) + bias
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Pre-norm MLP (released names: norm, fc1, fc2)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B*nW, window*window, C)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).transpose(2, 3)
    return x.reshape(-1, window * window, c)


def from_windows(x: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of to_windows: (B*nW, window*window, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // window, w // window, window, window, c).transpose(2, 3)
    return x.reshape(-1, h, w, c)


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise local conv, MLP. Works on channels-last maps (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window
        pad_h, pad_w = -h % ws, -w % ws
        # Padding happens before the attention's LayerNorm, so padded tokens take part as keys
        # (LayerNorm maps them to its bias), exactly as in the released model.
        padded = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        hp, wp = h + pad_h, w + pad_w
        attended = from_windows(self.attn(to_windows(padded, ws)), ws, hp, wp)[:, :h, :w]
        x = x + attended
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, C, H, W
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionStage(nn.Module):
    def __init__(self, blocks: List[TinyViTBlock], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, C, H, W
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """(B, 3, S, S) normalised image -> (B, out_chans, S/16, S/16) embedding."""

    def __init__(self, cfg: Optional[TinyViTConfig] = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or TinyViTConfig(**overrides)
        stages = len(cfg.embed_dims)
        if not (len(cfg.depths) == len(cfg.num_heads) == len(cfg.window_sizes) == stages) or stages < 2:
            raise ValueError("TinyViT needs embed_dims, depths, num_heads, window_sizes of one length >= 2")
        if cfg.img_size % 16:
            raise ValueError(f"TinyViT img_size must be a multiple of 16, got {cfg.img_size}")
        self.config = cfg
        self.img_size = cfg.img_size
        self.patch_embed = Stem(cfg.in_chans, cfg.embed_dims[0])

        # Patch merging halves the grid until it reaches SAM's 1/16 embedding grid, then keeps it
        # (in vit_t the last merging only widens 160 -> 320 channels at 64x64).
        side = cfg.img_size // 4
        layers: List[nn.Module] = []
        for i in range(stages):
            downsample = None
            if i < stages - 1:
                stride = 2 if side > cfg.embedding_grid else 1
                downsample = PatchMerging(cfg.embed_dims[i], cfg.embed_dims[i + 1], stride)
                next_side = side // stride
            if i == 0:
                layers.append(ConvStage(cfg.embed_dims[0], cfg.depths[0], cfg.mbconv_expand_ratio, downsample))
            else:
                blocks = [
                    TinyViTBlock(
                        cfg.embed_dims[i], cfg.num_heads[i], cfg.window_sizes[i], cfg.mlp_ratio, cfg.local_conv_size
                    )
                    for _ in range(cfg.depths[i])
                ]
                layers.append(AttentionStage(blocks, downsample))
            if downsample is not None:
                side = next_side
        if side != cfg.embedding_grid:
            raise ValueError(f"{stages} stages reach a {side}x{side} grid, not the 1/16 grid SAM needs")
        self.layers = nn.ModuleList(layers)

        if cfg.num_classes > 0:  # kept only so that the released keys load unchanged; never used
            self.norm_head = nn.LayerNorm(cfg.embed_dims[-1])
            self.head = nn.Linear(cfg.embed_dims[-1], cfg.num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dims[-1], cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    @property
    def interm_dim(self) -> int:
        """Channels of the early feature HQ-SAM fuses: the output of stage 1."""
        return self.config.embed_dims[2] if len(self.config.embed_dims) > 2 else self.config.embed_dims[1]

    def forward_with_interm(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embedding (B, 256, 64, 64) and the early feature after stage 1 (B, C1, 64, 64)."""
        x = self.patch_embed(x)
        interm = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 1:
                interm = x
        return self.neck(x), interm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # B, C0, S/4, S/4
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)  # B, 256, S/16, S/16


ENCODER_BUILDERS["tiny_vit"] = TinyViT


def mobile_sam_config() -> SamConfig:
    """MobileSAM as released (`vit_t`): TinyViT-5M encoder, SAM's prompt encoder and mask decoder."""
    return SamConfig(encoder=TinyViTConfig(), encoder_kind="tiny_vit")
