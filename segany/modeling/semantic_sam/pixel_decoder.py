"""The pixel decoder (Mask DINO's multi-scale encoder): res3..res5 and one extra stride-64 level are
projected to a common width, refined jointly by a multi-scale deformable-attention encoder, and the
finest of them is fused with res2 in one FPN step to give the stride-4 mask features."""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import PixelDecoderConfig
from .deformable_attention import MSDeformAttn


def sine_position_embedding(h: int, w: int, num_feats: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 2*num_feats, H, W) DETR sine embedding of normalised row (first half) and column positions."""
    eps, scale = 1e-6, 2 * math.pi
    ones = torch.ones(1, h, w, device=device, dtype=dtype)
    y = ones.cumsum(1, dtype=dtype)
    x = ones.cumsum(2, dtype=dtype)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=dtype, device=device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class ConvNorm(nn.Sequential):
    """Conv2d then GroupNorm: the released `input_proj.{i}.{0,1}`."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2), nn.GroupNorm(groups, cout))


class NormConv2d(nn.Conv2d):
    """Bias-free conv with its GroupNorm held as `.norm` (the released `adapter_1`, `layer_1`), then `act`."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int, relu: bool):
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups, cout)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class EncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then a ReLU feed-forward."""

    def __init__(self, dim: int, ffn: int, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, reference, shapes):
        src = self.norm1(src + self.self_attn(src + pos, reference, src, shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.conv_dim, cfg.dim_feedforward, cfg.num_levels, cfg.num_heads, cfg.num_points)
            for _ in range(cfg.encoder_layers)
        )


class DeformableTransformer(nn.Module):
    """Holds the released `transformer.level_embed` and `transformer.encoder.layers`."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.level_embed = nn.Parameter(torch.zeros(cfg.num_levels, cfg.conv_dim))
        self.encoder = DeformableEncoder(cfg)

    def forward(self, srcs: Sequence[torch.Tensor], pos: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        b = srcs[0].shape[0]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # B, S, C
        lvl_pos = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1) for i, p in enumerate(pos)], 1)
        # every pixel's centre, normalised per level; the same point on every level (no padding mask)
        refs = []
        for h, w in shapes:
            ry, rx = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=flat.dtype, device=flat.device),
                torch.linspace(0.5, w - 0.5, w, dtype=flat.dtype, device=flat.device), indexing="ij")
            refs.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
        reference = torch.cat(refs, 0)[None, :, None, :].expand(b, -1, len(shapes), -1)  # B, S, L, 2
        x = flat
        for layer in self.encoder.layers:
            x = layer(x, lvl_pos, reference, shapes)
        out = x.split([h * w for h, w in shapes], dim=1)
        return [o.transpose(1, 2).reshape(b, -1, h, w) for o, (h, w) in zip(out, shapes)]


class PixelDecoder(nn.Module):
    def __init__(self, cfg: PixelDecoderConfig, in_channels: Sequence[int]):
        """in_channels: channels of res2..res5."""
        super().__init__()
        self.cfg = cfg
        c, g = cfg.conv_dim, cfg.gn_groups
        extra = cfg.num_levels - 3
        # res3, res4, res5 by 1x1 convs, then strided 3x3 convs below res5
        projs = [ConvNorm(ch, c, 1, 1, g) for ch in in_channels[1:4]]
        projs += [ConvNorm(in_channels[3] if i == 0 else c, c, 3, 2, g) for i in range(extra)]
        self.input_proj = nn.ModuleList(projs)
        self.transformer = DeformableTransformer(cfg)
        self.mask_features = nn.Conv2d(c, cfg.mask_dim, 1)
        self.adapter_1 = NormConv2d(in_channels[0], c, 1, g, relu=False)
        self.layer_1 = NormConv2d(c, c, 3, g, relu=True)

    def forward(self, features: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """-> mask features (B, mask_dim, H/4, W/4), multi-scale features [strides 8, 16, 32, 64] (B, C, h, w)."""
        half = self.cfg.conv_dim // 2
        srcs, pos = [], []
        for i, name in enumerate(("res3", "res4", "res5")):
            x = features[name]
            srcs.append(self.input_proj[i](x))
            pos.append(sine_position_embedding(*x.shape[-2:], half, x.device, x.dtype))
        prev = features["res5"]
        for proj in self.input_proj[3:]:
            prev = proj(prev)
            srcs.append(prev)
            pos.append(sine_position_embedding(*prev.shape[-2:], half, prev.device, prev.dtype))
        levels = self.transformer(srcs, pos)
        lateral = self.adapter_1(features["res2"])
        fpn = self.layer_1(lateral + F.interpolate(levels[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_features(fpn), levels
