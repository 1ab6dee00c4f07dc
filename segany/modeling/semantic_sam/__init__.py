"""Semantic-SAM (Li et al., 2023): one click, six granularities. Model definition only."""
from .config import (
    LEVEL_TO_TOKEN,
    LEVELS,
    SEMANTIC_SAM_CONFIGS,
    DecoderConfig,
    PixelDecoderConfig,
    SemanticSamConfig,
    SwinConfig,
    infer_config,
    is_semantic_sam_state_dict,
    swin_l_config,
    swin_t_config,
)
from .model import ImageFeatures, SemanticSam

__all__ = [
    "DecoderConfig",
    "ImageFeatures",
    "LEVELS",
    "LEVEL_TO_TOKEN",
    "PixelDecoderConfig",
    "SEMANTIC_SAM_CONFIGS",
    "SemanticSam",
    "SemanticSamConfig",
    "SwinConfig",
    "infer_config",
    "is_semantic_sam_state_dict",
    "swin_l_config",
    "swin_t_config",
]
