"""Training, fine-tuning and distillation with SAM's recipe (`segany train`, `segany distill`)."""
from .data import AugmentConfig, parse_data_spec
from .distill import DistillConfig, Distiller
from .losses import dice_loss, sam_loss, sigmoid_focal_loss
from .prompts import PromptConfig
from .trainer import Trainer, TrainConfig

__all__ = [
    "AugmentConfig",
    "DistillConfig",
    "Distiller",
    "PromptConfig",
    "TrainConfig",
    "Trainer",
    "dice_loss",
    "parse_data_spec",
    "sam_loss",
    "sigmoid_focal_loss",
]
