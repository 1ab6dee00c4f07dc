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
    lower: torch.Tensor  # (M, L, P) float: 0, the smallest clamped position
    upper_x: torch.Tensor  # (M, L, P) float: W + 1, the largest clamped x (padded frame)
    upper_y: torch.Tensor  # (M, L, P) float: H + 1
    to_padded: torch.Tensor  # (L, 1, 2) float: (W, H), normalised [0, 1] -> pixels of each level
    line: torch.Tensor  # (M, L, P) int32: table rows between vertical neighbours, (W + 3) * M
    start: torch.Tensor  # (M, L, P) int32: first table row of each level, plus the head


@lru_cache(maxsize=64)
def table_geometry(shapes: Tuple[Tuple[int, int], ...], heads: int, points: int, device: torch.device) -> TableGeometry:
    m, levels = heads, len(shapes)
    hw = torch.tensor(shapes, dtype=torch.int64)  # L, 2 as (H, W)
    height, width = hw[:, 0], hw[:, 1]
    padded = (height + BEFORE + AFTER) * (width + BEFORE + AFTER)
    start = torch.cat([padded.new_zeros(1), padded.cumsum(0)[:-1]])

    # per (head, level, point), contiguous: elementwise operations with bounds in the points' own
    # layout are an order of magnitude quicker than with broadcast per-level ones
    def per_point(t: torch.Tensor, dtype=torch.int32) -> torch.Tensor:  # (L,) -> (M, L, P)
        return t.view(1, levels, 1).expand(m, levels, points).to(dtype).contiguous().to(device)

    head = torch.arange(m, dtype=torch.int32, device=device).view(m, 1, 1)
    size_xy = torch.stack([width, height], -1).view(levels, 1, 2).float()
    return TableGeometry(
        tuple(shapes), m, int(padded.sum()) * m, per_point(torch.zeros(levels), torch.float32),
        per_point(width + 1, torch.float32), per_point(height + 1, torch.float32), size_xy.to(device),
        per_point((width + BEFORE + AFTER) * m), per_point(start * m) + head,
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


def sample(table: ValueTable, px: torch.Tensor, py: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The attention's weighted sum of bilinear samples.

    px, py: (B, Q, M, L, P) positions in the padded pixel frame of each level: x + 1 - 0.5 for a
    location x in pixels, i.e. normalised * W + 0.5 (may be strided views; clamped here, not in
    place); weights: (B, Q, M, L, P) -> (B, Q, M*D)."""
    b, q, m, levels, points = px.shape
    th = table.heads  # m, or 1 for a table that every head reads
    if th not in (1, m):
        raise ValueError(f"a table of {th} heads read by {m}")
    g = table_geometry(table.shapes, th, points, px.device)
    lower = g.lower.to(px.dtype)
    px = torch.clamp(px, min=lower, max=g.upper_x.to(px.dtype))
    py = torch.clamp(py, min=lower, max=g.upper_y.to(py.dtype))
    x0, y0 = px.floor(), py.floor()
    far_x, far_y = px - x0, py - y0  # weight of the far neighbour (x0 + 1 or y0 + 1) per axis
    near_x, near_y = 1 - far_x, 1 - far_y
    wy0 = near_y * weights
    wy1 = far_y * weights
    # bags of L*P*4 entries per (batch, query, head), the 4 neighbours outermost
    w = torch.empty(b, q, m, 4, levels, points, dtype=table.rows.dtype, device=px.device)
    torch.mul(near_x, wy0, out=w[:, :, :, 0])
    torch.mul(far_x, wy0, out=w[:, :, :, 1])
    torch.mul(near_x, wy1, out=w[:, :, :, 2])
    torch.mul(far_x, wy1, out=w[:, :, :, 3])
    # table row of the (x0, y0) corner: (b * rows + level start + y0 * line + x0) * M + head
    first = torch.addcmul(g.start, y0.to(torch.int32), g.line)
    first.add_(x0.to(torch.int32), alpha=th)
    if b > 1:
        first += (torch.arange(b, dtype=torch.int32, device=px.device) * g.rows).view(b, 1, 1, 1, 1)
    rows = torch.empty(b, q, m, 4, levels, points, dtype=torch.int32, device=px.device)
    rows[:, :, :, 0] = first
    torch.add(first, th, out=rows[:, :, :, 1])
    torch.add(first, g.line, out=rows[:, :, :, 2])
    torch.add(rows[:, :, :, 2], th, out=rows[:, :, :, 3])
    out = F.embedding_bag(rows.view(b * q * m, -1), table.rows, per_sample_weights=w.view(b * q * m, -1), mode="sum")
    return out.view(b, q, -1)
