"""Semantic-SAM at inference: the image's features and the click path, the same maths as
segany.modeling.semantic_sam in fewer, larger operations.

Image features (`image_features`): the deformable attention reads its bilinear samples as one weighted
gather from a table of values with zero borders (segany.engine.deformable), its sampling offsets and
attention logits come from one product that also adds the reference points; the Swin blocks gather
their window rows (padding, cyclic shift, partition) in one copy, run qkv, one scaled_dot_product_attention
with the relative-position bias and shift mask in a single cached mask, in bands of windows that stay
in cache, and scatter back in one copy; products go through oneDNN with weights packed once (_product) and the
activations and residual additions applied by their kernels; position embeddings and reference points
are built once per feature size. Float32 throughout; only the order of floating-point sums differs
from the definition (tests/test_semantic_sam_engine.py).

Click path: the decoder's cross-attention would project the whole flattened feature pyramid (~15k
tokens for a 640x1138 image) to values in every layer, for every click. `ImageValues` holds, per image,
the pyramid as one zero-bordered table (with a column of ones); for a click's few queries each layer
gathers from it and projects only the gathered rows (the projection is linear, the sampling a weighted
sum: the same maths in another order); for many queries (everything mode) each layer's projected table
is made once per image on first need. Otherwise `decode` runs the same layers as `SemanticSam.decode`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from ..modeling.semantic_sam import ImageFeatures, SemanticSam
from ..modeling.semantic_sam.decoder import DecoderOutput, box_sine_embedding, inverse_sigmoid
from ..modeling.semantic_sam.deformable_attention import MSDeformAttn
from ..modeling.semantic_sam.pixel_decoder import NormConv2d, PixelDecoder, sine_position_embedding
from ..modeling.semantic_sam.swin import PatchMerging, SwinBlock, SwinTransformer, shift_mask, window_partition
from . import deformable, kernels
from .cache import kept_until_changed, tensor_version

@torch.no_grad()
def deformable_sample(
    value: torch.Tensor, shapes: Sequence[Tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """segany.modeling.semantic_sam.deformable_attention.deformable_sample as one weighted gather
    (segany.engine.deformable). value: (B, S, M, D); locations: (B, Q, M, L, P, 2) in [0, 1];
    weights: (B, Q, M, L, P) -> (B, Q, M*D)"""
    table = deformable.value_table(value, shapes)
    geometry = deformable.table_geometry(table.shapes, table.heads, locations.shape[4], locations.device)
    pix = locations * geometry.to_padded.to(locations.dtype) + 0.5
    return deformable.sample(table, pix[..., 0], pix[..., 1], weights)


def _offsets_and_logits(attn: MSDeformAttn) -> Tuple[torch.Tensor, torch.Tensor]:
    """The sampling-offset and attention-weight layers as one, its outputs per query: every x offset
    (M, L, P), every y offset, then the logits (M, L*P); kept until the layers change."""
    layers = (attn.sampling_offsets, attn.attention_weights)

    def build():
        k = attn.n_heads * attn.n_levels * attn.n_points
        c = attn.sampling_offsets.weight.shape[1]
        w_xy = attn.sampling_offsets.weight.detach().view(k, 2, c).transpose(0, 1).reshape(2 * k, c)
        b_xy = attn.sampling_offsets.bias.detach().view(k, 2).t().reshape(2 * k)
        return (torch.cat([w_xy, attn.attention_weights.weight.detach()], 0).contiguous(),
                torch.cat([b_xy, attn.attention_weights.bias.detach()], 0).contiguous())

    tensors = [t for l in layers for t in (l.weight, l.bias)]
    return kept_until_changed(attn, "_engine_offsets_and_logits", tensors, build)


@torch.no_grad()
def deformable_attend(
    attn: MSDeformAttn, query: torch.Tensor, reference: torch.Tensor, table: deformable.ValueTable,
    base: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MSDeformAttn.attend (before its output projection) with the values as a deformable.ValueTable.

    reference: (B, Q, L, 2) points or (B, Q, L, 4) boxes; for points, `base` may hold the reference
    points already in the table's pixel frame, laid out as the output of _offsets_and_logits (zeros
    under the logits: (Q, M*L*P*3)); that layer's product then adds them -> (B, Q, M*D)"""
    b, q, c = query.shape
    m, lv, p = attn.n_heads, attn.n_levels, attn.n_points
    geometry = deformable.table_geometry(table.shapes, m, p, query.device)
    weight, bias = _offsets_and_logits(attn)
    k = m * lv * p
    if base is not None:
        residual = base if b == 1 else base.repeat(b, 1)
        out = _product(query.reshape(b * q, c), weight, bias, residual=residual).view(b, q, -1)
    else:
        out = _product(query, weight, bias)
    px, py = out[..., :k].view(b, q, m, lv, p), out[..., k:2 * k].view(b, q, m, lv, p)
    weights = out[..., 2 * k:].reshape(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
    if base is None:
        size_x, size_y = geometry.to_padded.to(query.dtype).view(lv, 2).unbind(-1)  # L
        size_x, size_y = size_x.view(lv, 1), size_y.view(lv, 1)
        if reference.shape[-1] == 2:
            # offsets are in pixels of each level
            px = (reference[:, :, None, :, None, 0] * size_x + 0.5) + px
            py = (reference[:, :, None, :, None, 1] * size_y + 0.5) + py
        else:
            # offsets in units of half the box, divided among the points
            box = reference[:, :, None, :, None, :]
            px = (box[..., 0] + px / p * box[..., 2] * 0.5) * size_x + 0.5
            py = (box[..., 1] + py / p * box[..., 3] * 0.5) * size_y + 0.5
    return deformable.sample(table, px, py, weights)


# Feed-forward blocks run in row chunks so that the wide hidden activations stay in cache.
FFN_CHUNK_ROWS = 1024


# Row count oneDNN is told to expect when it lays out (packs) a layer's weights once for its kernels;
# the products run in chunks of about this many rows.
PACKED_ROWS = 1024


# weight -> (its identity when packed, packed copy); outside the weight tensors themselves, whose
# __dict__ goes with them into copy.deepcopy and torch.save, which cannot copy oneDNN's opaque tensors
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) in oneDNN's own layout for its float32 kernels, kept until weight changes."""
    key = (weight.data_ptr(), tensor_version(weight), weight.dtype, weight.device, tuple(weight.shape))
    hit = _PACKED.get(weight)
    if hit is None or hit[0] != key:
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACKED_ROWS))
        _PACKED[weight] = hit
    return hit[1]


def _product(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """activation(x @ weight^T + bias) + residual (activation None, "gelu" or "relu"; not both).

    Float32 on the CPU (inference only, as every function here): oneDNN's kernel with the weights packed once
    (_packed_weight) and the activation or the residual applied while the output is in cache; else (and
    for a few rows, where packing buys nothing) F.linear and the operations after it."""
    out_features = weight.shape[0]
    if (kernels.ENABLED and x.is_cpu and x.dtype is torch.float32 and weight.dtype is x.dtype
            and (bias is None or bias.dtype is x.dtype) and x.numel() >= 64 * x.shape[-1]
            and kernels.onednn_packed_usable(torch.float32)
            and (residual is None or (residual.is_contiguous() and residual.dtype is x.dtype
                                      and residual.shape == x.shape[:-1] + (out_features,)))):
        ops = torch.ops.mkldnn
        rows = x.reshape(-1, x.shape[-1])
        packed = _packed_weight(weight)
        if residual is not None:
            y = ops._linear_pointwise.binary(rows, residual.view(-1, out_features), packed, bias, "add")
        elif activation is None:
            y = ops._linear_pointwise(rows, packed, bias, "none", [], "")
        else:
            y = ops._linear_pointwise(rows, packed, bias, activation, [], "none" if activation == "gelu" else "")
        return y.view(*x.shape[:-1], out_features)
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "relu":
        y = F.relu(y)
    return y if residual is None else residual + y


@torch.no_grad()
def residual_ffn(
    residual: torch.Tensor, x: torch.Tensor, first: torch.nn.Linear, second: torch.nn.Linear, activation: str
) -> torch.Tensor:
    """residual + second(activation(first(x))) for (B, N, C) tensors, computed in chunks of rows, the
    activation and the residual added by the products' kernels (_product); activation "gelu" or "relu"."""
    flat = x.reshape(-1, x.shape[-1])
    skip = residual.reshape(-1, residual.shape[-1])
    out = torch.empty_like(skip)
    for i in range(0, flat.shape[0], FFN_CHUNK_ROWS):
        rows = slice(i, i + FFN_CHUNK_ROWS)
        hidden = _product(flat[rows], first.weight, first.bias, activation)
        out[rows] = _product(hidden, second.weight, second.bias, residual=skip[rows])
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


class _WindowOrder(NamedTuple):
    gather: torch.Tensor  # (B*nW*N,) for each window position, its token row (any row for padding)
    padding: torch.Tensor  # window positions that are padding (zero after the norm, as F.pad makes them)
    scatter: torch.Tensor  # (B*H*W,) for each token, its window position


@lru_cache(maxsize=64)
def _window_order(b: int, h: int, wd: int, w: int, shift: int, device: torch.device) -> _WindowOrder:
    """Zero-padding to whole windows, the cyclic shift and the window partition of SwinBlock as one
    row gather from the token rows (B*H*W, C) to the window rows (B*nW*w*w, C), and back."""
    hp, wp = -(-h // w) * w, -(-wd // w) * w
    token = torch.full((hp, wp), -1, dtype=torch.int64)
    token[:h, :wd] = torch.arange(h * wd).view(h, wd)
    if shift:
        token = torch.roll(token, shifts=(-shift, -shift), dims=(0, 1))
    token = window_partition(token.view(1, hp, wp, 1), w).reshape(-1)  # nW*N
    token = torch.cat([torch.where(token < 0, token, token + i * h * wd) for i in range(b)])
    padding = (token < 0).nonzero().view(-1)
    scatter = torch.empty(b * h * wd, dtype=torch.int64)
    scatter[token[token >= 0]] = (token >= 0).nonzero().view(-1)
    return _WindowOrder(token.clamp(min=0).to(device), padding.to(device), scatter.to(device))


def _swin_block(block: SwinBlock, x: torch.Tensor, h: int, wd: int) -> torch.Tensor:
    """SwinBlock.forward: the window rows gathered in one copy (_window_order), then qkv, attention
    (one scaled_dot_product_attention with the cached bias) and the output projection's input in
    bands of windows that stay in cache; the residuals added by the products' kernels."""
    b, _, c = x.shape
    w = block.window_size
    attn = block.attn
    order = _window_order(b, h, wd, w, block.shift, x.device)
    windows = block.norm1(x).view(-1, c).index_select(0, order.gather)  # B*nW*N, C
    if order.padding.numel():
        windows.index_fill_(0, order.padding, 0.0)
    hp, wp = -(-h // w) * w, -(-wd // w) * w
    bias = _window_bias(block, hp, wp, x.device, x.dtype)  # nW or 1, heads, N, N
    n, heads = w * w, attn.num_heads
    per_image = (hp // w) * (wp // w)
    band = max(1, FFN_CHUNK_ROWS // n)
    out = torch.empty_like(windows)
    first = 0
    while first < b * per_image:
        last = min(first + band, (first // per_image + 1) * per_image)  # a band stays in one image
        rows = slice(first * n, last * n)
        qkv = _product(windows[rows], attn.qkv.weight, attn.qkv.bias).view(last - first, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        mask = bias if bias.shape[0] == 1 else bias[first % per_image:(last - 1) % per_image + 1]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)  # nb, heads, N, hd
        out[rows].view(last - first, n, heads, c // heads).copy_(o.transpose(1, 2))
        first = last
    tokens = out.index_select(0, order.scatter)  # B*H*W, C
    x = _product(tokens, attn.proj.weight, attn.proj.bias, residual=x.view(-1, c)).view(b, h * wd, c)
    return residual_ffn(x, block.norm2(x), block.mlp.fc1, block.mlp.fc2, "gelu")


def _patch_merging(merge: PatchMerging, x: torch.Tensor, h: int, wd: int) -> torch.Tensor:
    """PatchMerging.forward with its product through _product."""
    b, _, c = x.shape
    x = x.view(b, h, wd, c)
    if h % 2 or wd % 2:
        x = F.pad(x, (0, 0, 0, wd % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return _product(merge.norm(x.view(b, -1, 4 * c)), merge.reduction.weight, merge.reduction.bias)


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
        # (B, C, H, W) in channels-last memory: a view of the tokens, which the convolutions read as they are
        out[f"res{i + 2}"] = y.view(b, h, wd, -1).permute(0, 3, 1, 2)
        if stage.downsample is not None:
            x = _patch_merging(stage.downsample, x, h, wd)
            h, wd = (h + 1) // 2, (wd + 1) // 2
    return out


# ---- pixel decoder ----------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _encoder_geometry(
    shapes: Tuple[Tuple[int, int], ...], half: int, heads: int, points: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(S, C) sine position embedding of every level's pixels, and the deformable layers' `base`: every
    pixel's centre, normalised per level, in each level's padded pixel frame: x per head, level and
    point, then y, then zeros under the attention logits: (S, M*L*P*3)."""
    pos = torch.cat([sine_position_embedding(h, w, half)[0].flatten(1).t() for h, w in shapes], 0)
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
    reference = torch.cat(refs, 0)  # S, 2
    levels = len(shapes)
    to_padded = deformable.table_geometry(shapes, heads, points, torch.device("cpu")).to_padded  # L, 1, 2
    to_padded = to_padded.view(levels, 2).t().reshape(1, 2, 1, levels, 1)
    pix = (reference[:, :, None, None, None] * to_padded + 0.5).expand(-1, -1, heads, -1, points)
    pix = pix.reshape(len(reference), 2, -1)  # S, (x, y), (M, L, P)
    base = torch.cat([pix[:, 0], pix[:, 1], reference.new_zeros(len(reference), heads * levels * points)], 1)
    return pos, base


def _pointwise_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for a 1x1 convolution as a product over the pixels of x (B, C, H, W) in channels-last
    memory (_product); the result is channels-last too. Other convolutions: conv(x)."""
    plain = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
    if not plain or conv.padding_mode != "zeros":
        return conv(x)
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view where x is channels-last
    weight = kept_until_changed(conv, "_engine_weight_2d", [conv.weight],
                                lambda: conv.weight.detach().view(conv.out_channels, c))  # one object: packed once
    y = _product(pixels, weight, conv.bias)
    return y.view(b, h, w, -1).permute(0, 3, 1, 2)


def _conv_norm(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ConvNorm (conv, GroupNorm) or NormConv2d (conv with .norm, then ReLU if .relu) of the decoder."""
    if isinstance(layer, NormConv2d):
        y = layer.norm(_pointwise_conv(layer, x) if layer.kernel_size == (1, 1) else F.conv2d(
            x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups))
        return y.relu_() if layer.relu else y
    conv, norm = layer
    return norm(_pointwise_conv(conv, x))


@torch.no_grad()
def pixel_decoder_features(decoder: PixelDecoder, features: Dict[str, torch.Tensor]):
    """PixelDecoder.forward with the fast deformable attention and cached position embeddings."""
    srcs = [_conv_norm(proj, features[name]) for proj, name in zip(decoder.input_proj, ("res3", "res4", "res5"))]
    prev = features["res5"]
    for proj in decoder.input_proj[3:]:
        prev = _conv_norm(proj, prev)
        srcs.append(prev)
    shapes = tuple(tuple(s.shape[-2:]) for s in srcs)
    b = srcs[0].shape[0]
    transformer = decoder.transformer
    first = transformer.encoder.layers[0].self_attn if len(transformer.encoder.layers) else None
    heads, points = (first.n_heads, first.n_points) if first is not None else (1, 1)
    pos, base = _encoder_geometry(shapes, decoder.cfg.conv_dim // 2, heads, points)
    flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # B, S, C
    level_embed = torch.cat([transformer.level_embed[i].expand(h * w, -1) for i, (h, w) in enumerate(shapes)], 0)
    lvl_pos = (pos.to(flat) + level_embed)[None]
    base = base.to(flat)
    x = flat
    for layer in transformer.encoder.layers:
        attn = layer.self_attn
        value = _product(x, attn.value_proj.weight, attn.value_proj.bias).view(b, x.shape[1], attn.n_heads, -1)
        sampled = deformable_attend(attn, x + lvl_pos, None, deformable.value_table(value, shapes), base)
        x = layer.norm1(_product(sampled, attn.output_proj.weight, attn.output_proj.bias, residual=x))
        x = layer.norm2(residual_ffn(x, x, layer.linear1, layer.linear2, "relu"))
    per_level = x.split([h * w for h, w in shapes], 1)
    # (B, C, H, W) in channels-last memory, views of the tokens; the FPN step stays channels-last
    levels = [o.view(b, h, w, -1).permute(0, 3, 1, 2) for o, (h, w) in zip(per_level, shapes)]
    lateral = _conv_norm(decoder.adapter_1, features["res2"])
    up = F.interpolate(levels[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
    fpn = _conv_norm(decoder.layer_1, lateral.add_(up))
    return _pointwise_conv(decoder.mask_features, fpn), levels


@torch.no_grad()
def image_features(model: SemanticSam, image: torch.Tensor) -> ImageFeatures:
    """SemanticSam.image_features(image) through the paths above."""
    x = model.preprocess(image)
    backbone = swin_features(model.backbone, x)
    mask_features, multi_scale = pixel_decoder_features(model.sem_seg_head.pixel_decoder, backbone)
    return ImageFeatures(mask_features, multi_scale, tuple(image.shape[-2:]), tuple(x.shape[-2:]))


# Up to this many queries, the decoder's deformable cross-attention gathers from the image's features
# themselves and projects the few gathered rows (_click_values); more queries (everything mode) read
# each layer's projected values of the whole pyramid, made once per image on first need.
FEW_QUERIES = 64


@dataclass
class ImageValues:
    features: ImageFeatures
    shapes: List[Tuple[int, int]]
    memory: torch.Tensor  # (B, S, C) the flattened pyramid, coarsest level first
    table: deformable.ValueTable  # memory and a column of ones, zero-bordered, read by every head
    projected: Dict[int, deformable.ValueTable]  # per decoder layer, its projected values (made on need)


@torch.no_grad()
def image_values(model: SemanticSam, features: ImageFeatures) -> ImageValues:
    predictor = model.sem_seg_head.predictor
    memory, shapes = predictor.flatten_levels(features.multi_scale)
    b, s, c = memory.shape
    with_ones = torch.cat([memory, memory.new_ones(b, s, 1)], -1).view(b, s, 1, c + 1)
    return ImageValues(features, shapes, memory, deformable.value_table(with_ones, shapes), {})


def _cross_attention_values(layer_index: int, attn: MSDeformAttn, cache: ImageValues, query: torch.Tensor,
                            boxes: torch.Tensor) -> torch.Tensor:
    """attn's sampled values (before output_proj) for the queries (B, Q, C) and their boxes (B, Q, L, 4).

    The value projection is linear and the sampling a weighted sum, so for a few queries the sum is
    taken over the image's features and projected after: per head, W_m (sum_i w_i x_i) + b_m sum_i w_i,
    where sum_i w_i (the weights of corners inside the maps) is the gathered column of ones."""
    b, q, c = query.shape
    m = attn.n_heads
    if q > FEW_QUERIES:
        if layer_index not in cache.projected:
            s = cache.memory.shape[1]
            value = _product(cache.memory, attn.value_proj.weight, attn.value_proj.bias).view(b, s, m, -1)
            cache.projected[layer_index] = deformable.value_table(value, cache.shapes)
        return deformable_attend(attn, query, boxes, cache.projected[layer_index])
    gathered = deformable_attend(attn, query, boxes, cache.table).view(b, q, m, c + 1)
    weight = attn.value_proj.weight.view(m, -1, c)  # M, D, C
    heads = torch.einsum("bqmc,mdc->bqmd", gathered[..., :c], weight)
    return (heads + gathered[..., c:] * attn.value_proj.bias.view(m, -1)).reshape(b, q, -1)


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
    for i, (layer, box_head) in enumerate(zip(decoder.layers, decoder.bbox_embed)):
        layer_boxes.append(ref)
        query_pos = decoder.ref_point_head(box_sine_embedding(ref, tgt.shape[-1] // 2))
        q = (tgt + query_pos).transpose(0, 1)
        attn = layer.self_attn(q, q, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = layer.norm2(tgt + attn)
        boxes_per_level = ref[:, :, None].expand(-1, -1, levels, -1)
        cross = layer.cross_attn.output_proj(
            _cross_attention_values(i, layer.cross_attn, cache, tgt + query_pos, boxes_per_level))
        tgt = layer.norm1(tgt + cross)
        tgt = layer.norm3(tgt + layer.linear2(torch.relu(layer.linear1(tgt))))
        ref = (box_head(tgt) + inverse_sigmoid(ref)).sigmoid()
        outputs.append(decoder.norm(tgt))
    return predictor.heads(outputs, layer_boxes, cache.features.mask_features, boxes.shape[1])
