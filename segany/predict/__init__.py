"""Pre/post-processing, the predictors and everything mode."""
from .amg import AmgSettings, MaskGenerator, MaskSource, SamAutomaticMaskGenerator, SamMaskSource
from .fastsam_predictor import FastSamPredictor
from .predictor import SamPredictor
from .segmenter import ImageEmbedding, Prediction, Prompt, Segmenter
from .text_select import ClipScorer, TextMatch, select_by_text
from .transforms import ResizeLongestSide

__all__ = [
    "AmgSettings",
    "FastSamPredictor",
    "MaskGenerator",
    "MaskSource",
    "SamAutomaticMaskGenerator",
    "SamMaskSource",
    "ClipScorer", "TextMatch", "select_by_text",
    "ImageEmbedding", "Prediction", "Prompt", "ResizeLongestSide", "SamPredictor", "Segmenter"]
