"""Pure nn.Modules of Segment Anything and its variants."""
from .build import ENCODER_BUILDERS, build_sam
from .config import SAM_CONFIGS, MaskDecoderConfig, SamConfig
from .image_encoder import ImageEncoderConfig, ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .transformer import TwoWayTransformer

__all__ = [
    "ENCODER_BUILDERS",
    "ImageEncoderConfig",
    "ImageEncoderViT",
    "MaskDecoder",
    "MaskDecoderConfig",
    "PromptEncoder",
    "SAM_CONFIGS",
    "Sam",
    "SamConfig",
    "TwoWayTransformer",
    "build_sam",
]
