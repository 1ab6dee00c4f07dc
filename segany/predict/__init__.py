"""Pre/post-processing, the predictors and everything mode."""
from .predictor import SamPredictor
from .segmenter import ImageEmbedding, Prediction, Prompt, Segmenter
from .transforms import ResizeLongestSide

__all__ = ["ImageEmbedding", "Prediction", "Prompt", "ResizeLongestSide", "SamPredictor", "Segmenter"]
