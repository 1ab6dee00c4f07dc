"""segany: Segment Anything, exact to the released models and fast on a CPU."""
from .io.checkpoint import load_checkpoint, save_checkpoint
from .io.errors import CheckpointError
from .io.models import load_model, sam_model_registry
from .modeling import Sam, SamConfig, build_sam
from .text import tokenize
from .predict import (
    AmgSettings,
    ImageEmbedding,
    MaskGenerator,
    Prediction,
    Prompt,
    SamAutomaticMaskGenerator,
    SamPredictor,
    Segmenter,
)

__version__ = "0.1.0"

__all__ = [
    "AmgSettings",
    "MaskGenerator",
    "SamAutomaticMaskGenerator",
    "CheckpointError",
    "ImageEmbedding",
    "Prediction",
    "Prompt",
    "Sam",
    "SamConfig",
    "SamPredictor",
    "Segmenter",
    "build_sam",
    "load_checkpoint",
    "load_model",
    "sam_model_registry",
    "save_checkpoint",
    "tokenize",
]
