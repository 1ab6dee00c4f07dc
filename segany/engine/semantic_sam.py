"""Semantic-SAM at inference: the image's features and the click path, the same maths as
segany.modeling.semantic_sam in fewer, larger operations.

Image features (`image_features`): the deformable attention reads its bilinear samples as one weighted
gather (`deformable_sample`, F.embedding_bag) instead of a grid_sample per level plus a weighted sum
over a stacked copy; the window attention of the Swin backbone is one scaled_dot_product_attention
with the relative-position bias and the shift mask added in a single cached mask; position embeddings
and reference points are built once per feature size. Float32 throughout; only the order of
floating-point sums differs from the definition (tests/test_semantic_sam_engine.py).

Click path: per click, the decoder's cross-attention projects the whole flattened feature pyramid (~15k tokens for
a 640x1138 image) to values in every layer, although that projection does not depend on the click.
`ImageValues` holds, per image, the flattened pyramid and every layer's projected values; `decode`
then runs the same layers with those values: the same operations on the same inputs, in the same
order, as `SemanticSam.decode`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..modeling.semantic_sam import ImageFeatures, SemanticSam
from ..modeling.semantic_sam.decoder import DecoderOutput, box_sine_embedding, inverse_sigmoid
from ..modeling.semantic_sam.deformable_attention import MSDeformAttn
from ..modeling.semantic_sam.pixel_decoder import PixelDecoder, sine_position_embedding
from ..modeling.semantic_sam.swin import SwinBlock, SwinTransformer, shift_mask, window_merge, window_partition
from .cache import kept_until_changed

@torch.no_grad()
def deformable_sample(
    value: torch.Tensor, shapes: Sequence[Tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """segany.modeling.semantic_sam.deformable_attention.deformable_sample as one weighted gather.

    Every output is a weighted sum of value rows: per query and head, L*P points x 4 bilinear corners,
    each weighted by (bilinear weight) x (attention weight), corners outside their level's map by 0
    (grid_sample's zero padding, align_corners=False). F.embedding_bag computes exactly such sums.
    value: (B, S, M, D); locations: (B, Q, M, L, P, 2) in [0, 1]; weights: (B, Q, M, L, P) -> (B, Q, M*D)
    """
    geometry = _level_geometry(tuple(map(tuple, shapes)), value.shape[2], value.device)
    return _sample_pixels(value, geometry, locations * geometry.size_xy.to(locations.dtype) - 0.5, weights)


def _sample_pixels(value: torch.Tensor, geometry: "_LevelGeometry", pix: torch.Tensor, weights: torch.Tensor):
    """deformable_sample with the locations in pixels of each level (B, Q, M, L, P, 2), centres at k."""
    b, s, m, d = value.shape
    q, _, levels, points = pix.shape[1:5]
    g = geometry.expanded(points)  # per (head, level, point) constants: long contiguous broadcasts
    corner = pix.floor()
    far = pix - corner  # weight of the far neighbour (x0 + 1 or y0 + 1) per axis
    near = 1 - far
    x0, y0 = corner.to(torch.int32).unbind(-1)
    # zero padding: a neighbour outside its level's map weighs 0
    wx0 = near[..., 0] * ((x0 >= 0) & (x0 < g.width))
    wx1 = far[..., 0] * ((x0 >= -1) & (x0 < g.width - 1))
    wy0 = near[..., 1] * ((y0 >= 0) & (y0 < g.height)) * weights
    wy1 = far[..., 1] * ((y0 >= -1) & (y0 < g.height - 1)) * weights
    # bags of L*P*4 entries per (batch, query, head), the 4 neighbours outermost
    w = torch.empty(b, q, m, 4, levels, points, dtype=value.dtype, device=value.device)
    torch.mul(wx0, wy0, out=w[:, :, :, 0])
    torch.mul(wx1, wy0, out=w[:, :, :, 1])
    torch.mul(wx0, wy1, out=w[:, :, :, 2])
    torch.mul(wx1, wy1, out=w[:, :, :, 3])
    # row of value.reshape(B*S*M, D) of the (x0, y0) neighbour: (b*S + level start + y0*W + x0) * M + head
    first = y0 * g.row_stride + x0 * m + g.head_start
    if b > 1:
        first += (torch.arange(b, dtype=torch.int32, device=value.device) * (s * m)).view(b, 1, 1, 1, 1)
    rows = torch.empty(b, q, m, 4, levels, points, dtype=torch.int32, device=value.device)
    rows[:, :, :, 0] = first
    torch.add(first, m, out=rows[:, :, :, 1])
    torch.add(first, g.row_stride, out=rows[:, :, :, 2])
    torch.add(rows[:, :, :, 2], m, out=rows[:, :, :, 3])
    rows.clamp_(0, b * s * m - 1)  # rows of zero-weight neighbours are only kept inside the table
    out = F.embedding_bag(rows.view(b * q * m, -1), value.reshape(b * s * m, d),
                          per_sample_weights=w.view(b * q * m, -1), mode="sum")
    return out.view(b, q, m * d)


class _Expanded(NamedTuple):
    width: torch.Tensor  # (M, L, P) int32
    height: torch.Tensor  # (M, L, P) int32
    row_stride: torch.Tensor  # (M, L, P) int32: W * M, the table rows between vertical neighbours
    head_start: torch.Tensor  # (M, L, P) int32: level start * M + head


class _LevelGeometry(NamedTuple):
    size_xy: torch.Tensor  # (L, 1, 2) float: (W, H) per level
    width: torch.Tensor  # (L, 1) int32
    height: torch.Tensor  # (L, 1) int32
    start: torch.Tensor  # (L, 1) int32: first row of the level in the flattened sequence
    heads: int
    by_points: Dict[int, _Expanded]

    def expanded(self, points: int) -> _Expanded:
        if points not in self.by_points:
            m, lv = self.heads, self.width.shape[0]
            head = torch.arange(m, dtype=torch.int32, device=self.width.device).view(m, 1, 1)

            def full(t: torch.Tensor) -> torch.Tensor:
                return t.view(1, lv, 1).expand(m, lv, points).contiguous()

            self.by_points[points] = _Expanded(full(self.width), full(self.height), full(self.width * m),
                                               (full(self.start * m) + head).contiguous())
        return self.by_points[points]


@lru_cache(maxsize=64)
def _level_geometry(shapes: Tuple[Tuple[int, int], ...], heads: int, device: torch.device) -> _LevelGeometry:
    hw = torch.tensor(shapes, dtype=torch.int32, device=device)  # L, 2 as (H, W)
    height, width = hw[:, 0:1], hw[:, 1:2]
    start = torch.cat([hw.new_zeros(1), (height * width).view(-1).cumsum(0)[:-1].to(torch.int32)]).view(-1, 1)
    size_xy = torch.stack([width, height], -1).float()
    return _LevelGeometry(size_xy, width, height, start, heads, {})


@torch.no_grad()
def deformable_attend(
    attn: MSDeformAttn, query: torch.Tensor, reference: torch.Tensor, value: torch.Tensor,
    shapes: Sequence[Tuple[int, int]],
) -> torch.Tensor:
    """MSDeformAttn.attend with `deformable_sample` above."""
    b, q, _ = query.shape
    m, lv, p = attn.n_heads, attn.n_levels, attn.n_points
    offsets = attn.sampling_offsets(query).view(b, q, m, lv, p, 2)
    weights = attn.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
    geometry = _level_geometry(tuple(map(tuple, shapes)), m, value.device)
    size_xy = geometry.size_xy.to(query.dtype)  # L, 1, 2
    if reference.shape[-1] == 2:
        # offsets are in pixels of each level: the reference point in pixels plus the offsets
        pix = (reference[:, :, None, :, None, :] * size_xy - 0.5) + offsets
    else:
        locations = reference[:, :, None, :, None, :2] + offsets / p * reference[:, :, None, :, None, 2:] * 0.5
        pix = locations * size_xy - 0.5
    return attn.output_proj(_sample_pixels(value, geometry, pix, weights))


# Feed-forward blocks run in row chunks so that the wide hidden activations stay in cache.
FFN_CHUNK_ROWS = 1024


@torch.no_grad()
def residual_ffn(
    residual: torch.Tensor, x: torch.Tensor, first: torch.nn.Linear, second: torch.nn.Linear, act
) -> torch.Tensor:
    """residual + second(act(first(x))) for (B, N, C) tensors, computed in chunks of rows."""
    flat = x.reshape(-1, x.shape[-1])
    skip = residual.reshape(-1, residual.shape[-1])
    out = torch.empty_like(skip)
    for i in range(0, flat.shape[0], FFN_CHUNK_ROWS):
        hidden = act(F.linear(flat[i:i + FFN_CHUNK_ROWS], first.weight, first.bias))
        rows = slice(i, i + FFN_CHUNK_ROWS)
        torch.add(skip[rows], F.linear(hidden, second.weight, second.bias), out=out[rows])
    return out.view(residual.shape)


# ---- Swin backbone ---------------------------------------------------------------------------------


def _window_bias(block: SwinBlock, hp: int, wp: int, device, dtype) -> torch.Tensor:
    """(nW, heads, N, N): the block's relative-position bias, plus the shift mask for shifted blocks;
    kept until the bias table changes (a new padded size rebuilds it)."""
    attn = block.attn

    def build() -> Dict[Tuple[int, int], torch.Tensor]:
        return {}

    per_size = kept_until_changed(attn, "_engine_window_bias", [attn.relative_position_bias_table], build)
    key = (hp, wp)
    if key not in per_size:
        n = block.window_size ** 2
        bias = attn.relative_position_bias_table[attn.relative_position_index.view(-1)].view(n, n, -1)
        bias = bias.permute(2, 0, 1)[None].to(device=device, dtype=dtype)  # 1, heads, N, N
        if block.shift:
            mask = shift_mask(hp, wp, block.window_size, block.shift).to(device=device, dtype=dtype)
            bias = bias + mask[:, None]  # nW, heads, N, N
        per_size[key] = bias.detach().contiguous()
    return per_size[key]


def _swin_block(block: SwinBlock, x: torch.Tensor, h: int, wd: int) -> torch.Tensor:
    """SwinBlock.forward with the window attention as one scaled_dot_product_attention."""
    b, _, c = x.shape
    w = block.window_size
    attn = block.attn
    y = block.norm1(x).view(b, h, wd, c)
    y = F.pad(y, (0, 0, 0, (w - wd % w) % w, 0, (w - h % w) % w))
    hp, wp = y.shape[1], y.shape[2]
    if block.shift:
        y = torch.roll(y, shifts=(-block.shift, -block.shift), dims=(1, 2))
    windows = window_partition(y, w)  # B*nW, N, C
    bw, n, _ = windows.shape
    heads = attn.num_heads
    qkv = attn.qkv(windows).reshape(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    bias = _window_bias(block, hp, wp, x.device, x.dtype)
    if bias.shape[0] != 1:
        bias = bias.repeat(b, 1, 1, 1) if b > 1 else bias
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias, scale=attn.scale)
    y = attn.proj(out.transpose(1, 2).reshape(bw, n, c))
    y = window_merge(y, w, hp, wp)
    if block.shift:
        y = torch.roll(y, shifts=(block.shift, block.shift), dims=(1, 2))
    x = x + y[:, :h, :wd, :].reshape(b, h * wd, c)
    return residual_ffn(x, block.norm2(x), block.mlp.fc1, block.mlp.fc2, F.gelu)


@torch.no_grad()
def swin_features(backbone: SwinTransformer, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """SwinTransformer.forward with the blocks above."""
    x = backbone.patch_embed(x)
    b, c, h, wd = x.shape
    x = backbone.patch_embed.norm(x.flatten(2).transpose(1, 2))
    out: Dict[str, torch.Tensor] = {}
    for i, stage in enumerate(backbone.layers):
        for block in stage.blocks:
            x = _swin_block(block, x, h, wd)
        y = getattr(backbone, f"norm{i}")(x)
        out[f"res{i + 2}"] = y.view(b, h, wd, -1).permute(0, 3, 1, 2).contiguous()
        if stage.downsample is not None:
            x = stage.downsample(x, h, wd)
            h, wd = (h + 1) // 2, (wd + 1) // 2
    return out


# ---- pixel decoder ----------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _encoder_geometry(shapes: Tuple[Tuple[int, int], ...], half: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S, C) sine position embedding of every level's pixels and (S, 2) their normalised centres."""
    pos = torch.cat([sine_position_embedding(h, w, half)[0].flatten(1).t() for h, w in shapes], 0)
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
    return pos, torch.cat(refs, 0)


@torch.no_grad()
def pixel_decoder_features(decoder: PixelDecoder, features: Dict[str, torch.Tensor]):
    """PixelDecoder.forward with the fast deformable attention and cached position embeddings."""
    srcs = [proj(features[name]) for proj, name in zip(decoder.input_proj, ("res3", "res4", "res5"))]
    prev = features["res5"]
    for proj in decoder.input_proj[3:]:
        prev = proj(prev)
        srcs.append(prev)
    shapes = [tuple(s.shape[-2:]) for s in srcs]
    b = srcs[0].shape[0]
    transformer = decoder.transformer
    pos, refs = _encoder_geometry(tuple(shapes), decoder.cfg.conv_dim // 2)
    flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # B, S, C
    level_embed = torch.cat([transformer.level_embed[i].expand(h * w, -1) for i, (h, w) in enumerate(shapes)], 0)
    lvl_pos = (pos.to(flat) + level_embed)[None]
    reference = refs.to(flat)[None, :, None, :].expand(b, -1, len(shapes), -1)
    x = flat
    for layer in transformer.encoder.layers:
        attn = layer.self_attn
        value = attn.value_proj(x).view(b, x.shape[1], attn.n_heads, -1)
        x = layer.norm1(x + deformable_attend(attn, x + lvl_pos, reference, value, shapes))
        x = layer.norm2(residual_ffn(x, x, layer.linear1, layer.linear2, F.relu))
    per_level = x.split([h * w for h, w in shapes], 1)
    levels = [o.transpose(1, 2).reshape(b, -1, h, w) for o, (h, w) in zip(per_level, shapes)]
    lateral = decoder.adapter_1(features["res2"])
    up = F.interpolate(levels[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
    fpn = decoder.layer_1(lateral + up)
    return decoder.mask_features(fpn), levels


@torch.no_grad()
def image_features(model: SemanticSam, image: torch.Tensor) -> ImageFeatures:
    """SemanticSam.image_features(image) through the paths above."""
    x = model.preprocess(image)
    backbone = swin_features(model.backbone, x)
    mask_features, multi_scale = pixel_decoder_features(model.sem_seg_head.pixel_decoder, backbone)
    return ImageFeatures(mask_features, multi_scale, tuple(image.shape[-2:]), tuple(x.shape[-2:]))


@dataclass
class ImageValues:
    features: ImageFeatures
    shapes: List[Tuple[int, int]]
    values: List[torch.Tensor]  # per decoder layer: (B, S, heads, D)


@torch.no_grad()
def image_values(model: SemanticSam, features: ImageFeatures) -> ImageValues:
    predictor = model.sem_seg_head.predictor
    memory, shapes = predictor.flatten_levels(features.multi_scale)
    b, s, _ = memory.shape
    values = [
        layer.cross_attn.value_proj(memory).view(b, s, layer.cross_attn.n_heads, -1)
        for layer in predictor.decoder.layers
    ]
    return ImageValues(features, shapes, values)


@torch.no_grad()
def decode(model: SemanticSam, cache: ImageValues, points: torch.Tensor) -> DecoderOutput:
    """SemanticSam.decode(cache.features, points), with the cached values."""
    predictor = model.sem_seg_head.predictor
    decoder = predictor.decoder
    boxes = model.click_boxes(points, cache.features)
    is_box = torch.zeros(boxes.shape[:2], dtype=torch.long, device=boxes.device)
    tgt, boxes_unsig = predictor.queries(boxes, is_box)
    ref = boxes_unsig.sigmoid()
    levels = len(cache.shapes)
    outputs, layer_boxes = [], []
    for layer, box_head, value in zip(decoder.layers, decoder.bbox_embed, cache.values):
        layer_boxes.append(ref)
        query_pos = decoder.ref_point_head(box_sine_embedding(ref, tgt.shape[-1] // 2))
        q = (tgt + query_pos).transpose(0, 1)
        attn = layer.self_attn(q, q, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = layer.norm2(tgt + attn)
        boxes_per_level = ref[:, :, None].expand(-1, -1, levels, -1)
        cross = deformable_attend(layer.cross_attn, tgt + query_pos, boxes_per_level, value, cache.shapes)
        tgt = layer.norm1(tgt + cross)
        tgt = layer.norm3(tgt + layer.linear2(torch.relu(layer.linear1(tgt))))
        ref = (box_head(tgt) + inverse_sigmoid(ref)).sigmoid()
        outputs.append(decoder.norm(tgt))
    return predictor.heads(outputs, layer_boxes, cache.features.mask_features, boxes.shape[1])
