"""Semantic-SAM's click path with the image's share of the decoder computed once.

Per click, the decoder's cross-attention projects the whole flattened feature pyramid (~15k tokens for
a 640x1138 image) to values in every layer, although that projection does not depend on the click.
`ImageValues` holds, per image, the flattened pyramid and every layer's projected values; `decode`
then runs the same layers with those values: the same operations on the same inputs, in the same
order, as `SemanticSam.decode`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import torch

from ..modeling.semantic_sam import ImageFeatures, SemanticSam
from ..modeling.semantic_sam.decoder import DecoderOutput, box_sine_embedding, inverse_sigmoid


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
        cross = layer.cross_attn.attend(tgt + query_pos, ref[:, :, None].expand(-1, -1, levels, -1), value, cache.shapes)
        tgt = layer.norm1(tgt + cross)
        tgt = layer.norm3(tgt + layer.linear2(torch.relu(layer.linear1(tgt))))
        ref = (box_head(tgt) + inverse_sigmoid(ref)).sigmoid()
        outputs.append(decoder.norm(tgt))
    return predictor.heads(outputs, layer_boxes, cache.features.mask_features, boxes.shape[1])
