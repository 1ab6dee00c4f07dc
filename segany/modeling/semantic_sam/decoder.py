"""The interactive Mask DINO decoder of Semantic-SAM.

A click is a tiny box. It becomes `num_mask_tokens` queries, one per granularity: content = the
prompt's label embedding + its type embedding (point/box) + that granularity's learned mask token;
position = the box. Each layer: self-attention among all queries, deformable cross-attention into the
multi-scale features around the query's box, a feed-forward; then the shared box head refines the box
that positions the next layer. Every query ends as a mask embedding dotted with the stride-4 mask
features and a predicted IoU score.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig
from .deformable_attention import MSDeformAttn


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [d_out]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: torch.Tensor, num_feats: int = 128) -> torch.Tensor:
    """(..., 4) boxes (cx, cy, w, h) in [0, 1] -> (..., 4*num_feats) sine embeddings ordered y, x, w, h."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)

    def embed(v: torch.Tensor) -> torch.Tensor:
        e = (v * (2 * math.pi))[..., None] / dim_t
        return torch.stack((e[..., 0::2].sin(), e[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat([embed(boxes[..., 1]), embed(boxes[..., 0]), embed(boxes[..., 2]), embed(boxes[..., 3])], -1)


class DecoderLayer(nn.Module):
    """Post-norm: self-attention (norm2), deformable cross-attention (norm1), feed-forward (norm3)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.cross_attn = MSDeformAttn(d, cfg.num_levels, cfg.num_heads, cfg.num_points)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, tgt, query_pos, boxes, memory, shapes):
        # tgt, query_pos: (B, Q, C); boxes: (B, Q, L, 4); memory: (B, S, C)
        q = (tgt + query_pos).transpose(0, 1)
        attn = self.self_attn(q, q, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + attn)
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, boxes, memory, shapes))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class TransformerDecoder(nn.Module):
    """Holds the released `decoder.layers`, `decoder.norm`, `decoder.ref_point_head`, `decoder.bbox_embed`."""

    def __init__(self, cfg: DecoderConfig, norm: nn.LayerNorm, bbox_embed: nn.ModuleList):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = norm  # the same module as the predictor's decoder_norm
        self.ref_point_head = MLP(2 * cfg.hidden_dim, cfg.hidden_dim, cfg.hidden_dim, 2)
        self.bbox_embed = bbox_embed  # one box MLP shared by every layer

    def forward(self, tgt, boxes_unsig, memory, shapes) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """-> normalised outputs of every layer (B, Q, C), and the box each layer was given (B, Q, 4)."""
        boxes = boxes_unsig.sigmoid()
        outputs, layer_boxes = [], []
        levels = len(shapes)
        for layer, box_head in zip(self.layers, self.bbox_embed):
            layer_boxes.append(boxes)
            query_pos = self.ref_point_head(box_sine_embedding(boxes, tgt.shape[-1] // 2))
            tgt = layer(tgt, query_pos, boxes[:, :, None].expand(-1, -1, levels, -1), memory, shapes)
            boxes = (box_head(tgt) + inverse_sigmoid(boxes)).sigmoid()
            outputs.append(self.norm(tgt))
        return outputs, layer_boxes


class DecoderOutput(NamedTuple):
    masks: torch.Tensor  # (B, N*T, H/4, W/4) last layer's mask logits, query = point-major then token
    ious: torch.Tensor  # (B, N, T) last layer's raw IoU scores
    ious_per_layer: torch.Tensor  # (layers, B, N, T)
    boxes_per_layer: torch.Tensor  # (layers, B, N*T, 4) refined (cx, cy, w, h) in the padded frame


class InteractiveDecoder(nn.Module):
    """The released `sem_seg_head.predictor`."""

    def __init__(self, cfg: DecoderConfig, mask_dim: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        # Language-side parameters of the release: unused by these models, kept so checkpoints load strictly.
        self.lang_mapper = nn.Parameter(torch.zeros(cfg.dim_proj, d))
        self.class_embed = nn.Parameter(torch.zeros(d, cfg.dim_proj))
        self.class_embed_part = nn.Parameter(torch.zeros(d, cfg.dim_proj))
        self.mask_embed = MLP(d, d, mask_dim, 3)
        self.decoder_norm = nn.LayerNorm(d)
        self._bbox_embed = MLP(d, d, 4, 3)
        self.bbox_embed = nn.ModuleList([self._bbox_embed] * cfg.num_layers)
        self.decoder = TransformerDecoder(cfg, self.decoder_norm, self.bbox_embed)
        self.iou_prediction_head = MLP(d, d, 1, 3)
        self.mask_tokens = nn.Embedding(cfg.num_mask_tokens, d)
        self.pb_embedding = nn.Embedding(2, d)  # prompt type: 0 point, 1 box
        self.label_enc = nn.Embedding(2, d)

    def queries(self, boxes: torch.Tensor, is_box: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """boxes (B, N, 4) in the padded frame, is_box (B, N) -> content (B, N*T, C), unsigmoided boxes (B, N*T, 4)."""
        t = self.cfg.num_mask_tokens
        prompt = self.label_enc(torch.zeros_like(is_box, dtype=torch.long)) + self.pb_embedding(is_box.long())
        content = prompt.repeat_interleave(t, 1) + self.mask_tokens.weight.repeat(1, boxes.shape[1], 1)
        return content, inverse_sigmoid(boxes).repeat_interleave(t, 1)

    def forward(
        self, multi_scale: Sequence[torch.Tensor], mask_features: torch.Tensor, boxes: torch.Tensor, is_box: torch.Tensor
    ) -> DecoderOutput:
        """multi_scale: pixel-decoder levels at strides 8, 16, 32, 64."""
        memory, shapes = self.flatten_levels(multi_scale)
        tgt, boxes_unsig = self.queries(boxes, is_box)
        outputs, layer_boxes = self.decoder(tgt, boxes_unsig, memory, shapes)
        return self.heads(outputs, layer_boxes, mask_features, boxes.shape[1])

    @staticmethod
    def flatten_levels(multi_scale: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """The decoder reads the levels coarsest first: -> memory (B, S, C), [(H, W), ...]."""
        levels = list(multi_scale)[::-1]
        shapes = [tuple(x.shape[-2:]) for x in levels]
        return torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1), shapes

    def heads(self, outputs: Sequence[torch.Tensor], layer_boxes: Sequence[torch.Tensor], mask_features: torch.Tensor,
              n: int) -> DecoderOutput:
        """Masks, IoU scores and refined boxes from every layer's output, for n prompts."""
        b, t = outputs[-1].shape[0], self.cfg.num_mask_tokens
        ious, refined = [], []
        for out, box_in in zip(outputs, layer_boxes):
            q = self.decoder_norm(out)  # normalised a second time, as released
            ious.append(self.iou_prediction_head(q).view(b, n, t))
            refined.append((self._bbox_embed(q) + inverse_sigmoid(box_in)).sigmoid())
        q = self.decoder_norm(outputs[-1])
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(q), mask_features)
        return DecoderOutput(masks, ious[-1], torch.stack(ious), torch.stack(refined))
