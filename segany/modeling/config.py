"""Model configurations as dataclasses, and the released sizes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Tuple

from .image_encoder import ImageEncoderConfig


@dataclass
class MaskDecoderConfig:
    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256


@dataclass
class SamConfig:
    """Everything needed to build a model. `encoder_kind` picks the image encoder family."""

    encoder: Any = field(default_factory=ImageEncoderConfig)
    encoder_kind: str = "vit"
    variant: str = "sam"  # "sam", or a variant's name (HQ-SAM: "hq") with a builder of its own
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)

    @property
    def image_size(self) -> int:
        return self.encoder.img_size

    @property
    def image_embedding_size(self) -> Tuple[int, int]:
        side = self.encoder.img_size // 16  # every released encoder downsamples 16x
        return side, side

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def vit_config(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: Tuple[int, ...]) -> SamConfig:
    return SamConfig(
        encoder=ImageEncoderConfig(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, global_attn_indexes=tuple(global_attn_indexes)
        )
    )


# The released SAM sizes (Kirillov et al., 2023).
SAM_CONFIGS: Dict[str, SamConfig] = {
    "vit_b": vit_config(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": vit_config(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": vit_config(1280, 32, 16, (7, 15, 23, 31)),
}
