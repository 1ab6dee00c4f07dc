"""Build a Sam module from a SamConfig."""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Type

from torch import nn

from .config import SAM_CONFIGS, SamConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

# encoder_kind -> constructor taking the encoder config. Variants register themselves here.
ENCODER_BUILDERS: Dict[str, Callable[[object], nn.Module]] = {"vit": ImageEncoderViT}


def build_mask_decoder(cfg: SamConfig, decoder_cls: Type[MaskDecoder] = MaskDecoder, **extra: Any) -> MaskDecoder:
    """The mask decoder of `cfg`; variants pass their subclass and its extra arguments (HQ-SAM: vit_dim)."""
    d = cfg.decoder
    return decoder_cls(
        **extra,
        transformer_dim=cfg.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=d.transformer_depth,
            embedding_dim=cfg.prompt_embed_dim,
            num_heads=d.transformer_num_heads,
            mlp_dim=d.transformer_mlp_dim,
        ),
        num_multimask_outputs=d.num_multimask_outputs,
        iou_head_depth=d.iou_head_depth,
        iou_head_hidden_dim=d.iou_head_hidden_dim,
    )


def build_prompt_encoder(cfg: SamConfig) -> PromptEncoder:
    return PromptEncoder(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=cfg.image_embedding_size,
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans,
    )


def build_sam(cfg: SamConfig | str) -> Sam:
    """Build an untrained model from a config or the name of a released size."""
    if isinstance(cfg, str):
        if cfg not in SAM_CONFIGS:
            raise ValueError(f"unknown model size {cfg!r}; known: {', '.join(sorted(SAM_CONFIGS))}")
        cfg = copy.deepcopy(SAM_CONFIGS[cfg])
    if cfg.encoder_kind not in ENCODER_BUILDERS:
        raise ValueError(f"unknown encoder kind {cfg.encoder_kind!r}; known: {', '.join(ENCODER_BUILDERS)}")
    model = Sam(
        image_encoder=ENCODER_BUILDERS[cfg.encoder_kind](cfg.encoder),
        prompt_encoder=build_prompt_encoder(cfg),
        mask_decoder=build_mask_decoder(cfg),
    )
    model.config = cfg
    return model.eval()
