"""Configurations of Semantic-SAM (Li et al., 2023) as released, and their inference from a state dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

import torch

# Granularity level (1 = coarsest "semantic" ... 6 = finest "part") -> index of the learned mask token,
# as the released automatic generator maps them (its `prompt_switch`).
LEVEL_TO_TOKEN: Dict[int, int] = {1: 3, 2: 2, 3: 0, 4: 4, 5: 1, 6: 5}
LEVELS: Tuple[int, ...] = (1, 2, 3, 4, 5, 6)

# The click becomes a tiny box of this width and height (normalised image coordinates).
CLICK_BOX_SIZE = 0.005


@dataclass
class SwinConfig:
    embed_dim: int = 96
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: float = 4.0

    @property
    def channels(self) -> List[int]:
        """Channels of res2..res5."""
        return [self.embed_dim * 2**i for i in range(len(self.depths))]


@dataclass
class PixelDecoderConfig:
    conv_dim: int = 256  # also the deformable encoder's width
    mask_dim: int = 256
    encoder_layers: int = 6
    dim_feedforward: int = 2048
    num_heads: int = 8
    num_levels: int = 4  # res3, res4, res5 and one extra stride-2 level below res5
    num_points: int = 4
    gn_groups: int = 32


@dataclass
class DecoderConfig:
    hidden_dim: int = 256
    num_layers: int = 9
    dim_feedforward: int = 2048
    num_heads: int = 8
    num_levels: int = 4
    num_points: int = 4
    num_mask_tokens: int = 6  # one per granularity level
    dim_proj: int = 512  # only the (unused) language-side parameters have this width


@dataclass
class SemanticSamConfig:
    swin: SwinConfig = field(default_factory=SwinConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    pixel_mean: Tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: Tuple[float, float, float] = (58.395, 57.12, 57.375)
    size_divisibility: int = 32
    short_edge: int = 640

    @property
    def size_name(self) -> str:
        """'t' or 'l' for the released configurations, else 'custom'."""
        for name, cfg in (("t", swin_t_config()), ("l", swin_l_config())):
            if self.swin == cfg.swin and self.pixel_decoder == cfg.pixel_decoder and self.decoder == cfg.decoder:
                return name
        return "custom"


def swin_t_config() -> SemanticSamConfig:
    """`semantic_sam_only_sa-1b_swinT.yaml` (swint_only_sam_many2many.pth)."""
    return SemanticSamConfig()


def swin_l_config() -> SemanticSamConfig:
    """`semantic_sam_only_sa-1b_swinL.yaml` (swinl_only_sam_many2many.pth)."""
    return SemanticSamConfig(swin=SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12))


SEMANTIC_SAM_CONFIGS = {"t": swin_t_config, "l": swin_l_config}

BACKBONE = "backbone."
PIXEL_DECODER = "sem_seg_head.pixel_decoder."
PREDICTOR = "sem_seg_head.predictor."


def is_semantic_sam_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for a Semantic-SAM state dict (after the `model.` prefix is stripped)."""
    return f"{PREDICTOR}mask_tokens.weight" in sd and f"{BACKBONE}patch_embed.proj.weight" in sd


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def infer_config(sd: Mapping[str, torch.Tensor]) -> SemanticSamConfig:
    """The architecture a state dict (keys without the `model.` prefix) was saved from.

    The head counts of the deformable attentions cannot be told apart from their point counts by the
    shapes alone; they are the released 8 heads, and the point count follows from that.
    """
    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"missing key {key!r}: not a Semantic-SAM checkpoint, or a damaged one")
        return sd[key]

    proj = need(f"{BACKBONE}patch_embed.proj.weight")  # (C, 3, p, p)
    num_stages = _count(sd, f"{BACKBONE}layers.")
    if num_stages == 0:
        raise ValueError("no Swin stages (backbone.layers.*) in the checkpoint")
    depths = tuple(_count(sd, f"{BACKBONE}layers.{i}.blocks.") for i in range(num_stages))
    heads, windows = [], set()
    for i in range(num_stages):
        table = need(f"{BACKBONE}layers.{i}.blocks.0.attn.relative_position_bias_table")  # ((2w-1)^2, nH)
        heads.append(int(table.shape[1]))
        side = round(table.shape[0] ** 0.5)
        if side * side != table.shape[0] or side % 2 == 0:
            raise ValueError(f"relative position table of stage {i} has {table.shape[0]} rows: not (2w-1)^2")
        windows.add((side + 1) // 2)
    if len(windows) != 1:
        raise ValueError(f"Swin stages use different window sizes {sorted(windows)}")
    embed_dim = int(proj.shape[0])
    fc1 = need(f"{BACKBONE}layers.0.blocks.0.mlp.fc1.weight")
    swin = SwinConfig(
        embed_dim=embed_dim, depths=depths, num_heads=tuple(heads), window_size=windows.pop(),
        patch_size=int(proj.shape[-1]), mlp_ratio=fc1.shape[0] / embed_dim,
    )

    level_embed = need(f"{PIXEL_DECODER}transformer.level_embed")  # (levels, C)
    enc = f"{PIXEL_DECODER}transformer.encoder.layers."
    pd_heads = 8
    pd_levels = int(level_embed.shape[0])
    pd_points = int(need(f"{enc}0.self_attn.attention_weights.weight").shape[0]) // (pd_heads * pd_levels)
    pixel_decoder = PixelDecoderConfig(
        conv_dim=int(level_embed.shape[1]), mask_dim=int(need(f"{PIXEL_DECODER}mask_features.weight").shape[0]),
        encoder_layers=_count(sd, enc), dim_feedforward=int(need(f"{enc}0.linear1.weight").shape[0]),
        num_heads=pd_heads, num_levels=pd_levels, num_points=pd_points,
    )

    dec = f"{PREDICTOR}decoder.layers."
    tokens = need(f"{PREDICTOR}mask_tokens.weight")  # (tokens, hidden)
    dec_points = int(need(f"{dec}0.cross_attn.attention_weights.weight").shape[0]) // (8 * pd_levels)
    decoder = DecoderConfig(
        hidden_dim=int(tokens.shape[1]), num_layers=_count(sd, dec),
        dim_feedforward=int(need(f"{dec}0.linear1.weight").shape[0]), num_heads=8, num_levels=pd_levels,
        num_points=dec_points, num_mask_tokens=int(tokens.shape[0]),
        dim_proj=int(need(f"{PREDICTOR}lang_mapper").shape[0]),
    )
    return SemanticSamConfig(swin=swin, pixel_decoder=pixel_decoder, decoder=decoder)
