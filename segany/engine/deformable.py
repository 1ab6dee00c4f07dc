"""Multi-scale deformable sampling (segany.modeling.semantic_sam.deformable_attention) as one weighted gather.

Every output is a weighted sum of value rows: per query and head, L*P points x 4 bilinear corners,
each weighted by (bilinear weight) x (attention weight). F.embedding_bag computes exactly such sums.

grid_sample's zero padding (align_corners=False) comes from the table itself: each level's values are
stored with a border of zero rows (one above and to the left, two below and to the right), and the
sampling positions are clamped into that border. A corner in the border reads a zero; a position
clamped from further out has both its corners in the border, or a weight of exactly 0 on the one
inside, so it adds nothing, as outside the map in grid_sample. This replaces per-corner validity masks
(two comparisons, a logical and and a product per corner) by one clamp.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

# Border of zeros around each level in the table: 1 before, 2 after (see the module's docstring).
BEFORE, AFTER = 1, 2


class TableGeometry(NamedTuple):
    shapes: Tuple[Tuple[int, int], ...]  # per level (H, W) of the maps
    heads: int
    rows: int  # table rows per batch element: sum over levels of (H + 3) * (W + 3), times heads
    lower: torch.Tensor  # (M, L, P, 2) float: 0, the smallest clamped position
    upper: torch.Tensor  # (M, L, P, 2) float: (W + 1, H + 1), the largest clamped position (padded frame)
    to_padded: torch.Tensor  # (L, 1, 2) float: (W, H), normalised [0, 1] -> pixels of each level
    line: torch.Tensor  # (M, L, P) int32: table rows between vertical neighbours, (W + 3) * M
    start: torch.Tensor  # (M, L, P) int32: first table row of each level, plus the head
    corners: torch.Tensor  # (M, 4, L, P) int32: table rows of the 4 corners after the top-left one


@lru_cache(maxsize=64)
def table_geometry(shapes: Tuple[Tuple[int, int], ...], heads: int, points: int, device: torch.device) -> TableGeometry:
    m, levels = heads, len(shapes)
    hw = torch.tensor(shapes, dtype=torch.int64)  # L, 2 as (H, W)
    height, width = hw[:, 0], hw[:, 1]
    padded = (height + BEFORE + AFTER) * (width + BEFORE + AFTER)
    start = torch.cat([padded.new_zeros(1), padded.cumsum(0)[:-1]])
    line = (width + BEFORE + AFTER) * m

    def per_point(t: torch.Tensor) -> torch.Tensor:  # (L,) -> (M, L, P)
        return t.view(1, levels, 1).expand(m, levels, points).to(torch.int32).contiguous()

    head = torch.arange(m, dtype=torch.int32).view(m, 1, 1)
    corners = torch.stack([torch.zeros_like(line), line.new_full(line.shape, m), line, line + m], 0)  # 4, L
    corners = corners.view(1, 4, levels, 1).expand(m, 4, levels, points).to(torch.int32).contiguous()
    size_xy = torch.stack([width, height], -1).view(levels, 1, 2).float()
    # full-size bounds: clamp with contiguous bounds of the points' own layout is an order of magnitude
    # quicker than with broadcast (L, 1, 2) ones
    upper = (size_xy + 1).view(1, levels, 1, 2).expand(m, levels, points, 2).contiguous()
    return TableGeometry(
        tuple(shapes), m, int(padded.sum()) * m,
        torch.zeros_like(upper).to(device), upper.to(device), size_xy.to(device),
        per_point(line).to(device), (per_point(start * m) + head).to(device), corners.to(device),
    )


class ValueTable(NamedTuple):
    """Per-head values of every level with their zero borders, as rows of an embedding table."""

    rows: torch.Tensor  # (B * geometry.rows, D)
    batch: int
    shapes: Tuple[Tuple[int, int], ...]
    heads: int


def value_table(value: torch.Tensor, shapes: Sequence[Tuple[int, int]]) -> ValueTable:
    """value: (B, S, M, D) per-head values of the levels `shapes`, flattened row-major and concatenated."""
    b, _, m, d = value.shape
    shapes = tuple((int(h), int(w)) for h, w in shapes)
    sizes = [(h + BEFORE + AFTER) * (w + BEFORE + AFTER) for h, w in shapes]
    table = value.new_zeros(b, sum(sizes), m, d)
    first = 0
    for level, (src, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], 1), shapes)):
        dst = table[:, first:first + sizes[level]].view(b, h + BEFORE + AFTER, w + BEFORE + AFTER, m, d)
        dst[:, BEFORE:BEFORE + h, BEFORE:BEFORE + w] = src.view(b, h, w, m, d)
        first += sizes[level]
    return ValueTable(table.view(-1, d), b, shapes, m)


def sample(table: ValueTable, pix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The attention's weighted sum of bilinear samples.

    pix: (B, Q, M, L, P, 2) positions in the padded pixel frame of each level: (x, y) + 1 - 0.5 for a
    location (x, y) in pixels, i.e. normalised * (W, H) + 0.5 (may be a strided view; clamped here,
    not in place); weights: (B, Q, M, L, P) -> (B, Q, M*D)."""
    b, q, m, levels, points, _ = pix.shape
    g = table_geometry(table.shapes, m, points, pix.device)
    pix = torch.clamp(pix, min=g.lower.to(pix.dtype), max=g.upper.to(pix.dtype))
    corner = pix.floor()
    far = pix - corner  # weight of the far neighbour (x0 + 1 or y0 + 1) per axis
    near = 1 - far
    x0, y0 = corner.to(torch.int32).unbind(-1)
    wy0 = near[..., 1] * weights
    wy1 = far[..., 1] * weights
    # bags of L*P*4 entries per (batch, query, head), the 4 neighbours outermost
    w = torch.empty(b, q, m, 4, levels, points, dtype=table.rows.dtype, device=pix.device)
    torch.mul(near[..., 0], wy0, out=w[:, :, :, 0])
    torch.mul(far[..., 0], wy0, out=w[:, :, :, 1])
    torch.mul(near[..., 0], wy1, out=w[:, :, :, 2])
    torch.mul(far[..., 0], wy1, out=w[:, :, :, 3])
    # table row of the (x0, y0) corner: (b * rows + level start + y0 * line + x0) * M + head
    first = torch.addcmul(g.start, y0, g.line)
    first.add_(x0 * m)
    if b > 1:
        first += (torch.arange(b, dtype=torch.int32, device=pix.device) * g.rows).view(b, 1, 1, 1, 1)
    rows = first.unsqueeze(3) + g.corners  # B, Q, M, 4, L, P
    out = F.embedding_bag(rows.view(b * q * m, -1), table.rows, per_sample_weights=w.view(b * q * m, -1), mode="sum")
    return out.view(b, q, -1)
