"""Multi-scale deformable attention (Zhu et al., 2021, Deformable DETR) in plain PyTorch.

Each query attends, per head, to `num_points` locations on each of `num_levels` feature maps: locations
offset from the query's reference point (or box) by learned offsets, features read by bilinear
interpolation (`grid_sample`, zero outside the map, align_corners=False, as the released CUDA kernel),
weighted by a softmax over all levels and points of the head.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def deformable_sample(
    value: torch.Tensor, shapes: Sequence[Tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The attention itself.

    value: (B, S, M, D) per-head values of all levels, flattened row-major and concatenated;
    locations: (B, Q, M, L, P, 2) in [0, 1] (x, y) of each level's map; weights: (B, Q, M, L, P).
    -> (B, Q, M*D)
    """
    b, _, m, d = value.shape
    _, q, _, levels, p, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1] frame
    sampled: List[torch.Tensor] = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # B*M, Q, P, 2
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # B*M, D, Q, P
    w_ = weights.transpose(1, 2).reshape(b * m, 1, q, levels * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w_).sum(-1)  # B*M, D, Q
    return out.view(b, m * d, q).transpose(1, 2)


class MSDeformAttn(nn.Module):
    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self, query: torch.Tensor, reference: torch.Tensor, source: torch.Tensor, shapes: Sequence[Tuple[int, int]]
    ) -> torch.Tensor:
        """query: (B, Q, C); reference: (B, Q, L, 2) points or (B, Q, L, 4) boxes (cx, cy, w, h), in [0, 1];
        source: (B, S, C) the flattened levels of `shapes` [(H, W), ...] -> (B, Q, C)."""
        value = self.value_proj(source).view(source.shape[0], source.shape[1], self.n_heads, -1)
        return self.attend(query, reference, value, shapes)

    def attend(
        self, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor, shapes: Sequence[Tuple[int, int]]
    ) -> torch.Tensor:
        """The attention given the projected per-head values (B, S, M, D) of the source."""
        b, q, _ = query.shape
        m, lv, p = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(b, q, m, lv, p, 2)
        weights = self.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
        if reference.shape[-1] == 2:
            # offsets in pixels of each level
            size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = reference[:, :, None, :, None, :] + offsets / size_xy[None, None, None, :, None, :]
        else:
            # offsets in units of half the box, divided among the points
            locations = (
                reference[:, :, None, :, None, :2] + offsets / p * reference[:, :, None, :, None, 2:] * 0.5
            )
        return self.output_proj(deformable_sample(value, shapes, locations, weights))
