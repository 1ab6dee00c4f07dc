"""Checkpoints, masks, RLE and file formats."""
from .atomic import atomic_write, atomic_write_bytes, atomic_write_text
from .checkpoint import (
    infer_config,
    load_checkpoint,
    model_from_state_dict,
    read_state_dict,
    save_checkpoint,
)
from .errors import CheckpointError
from . import variants, zoo  # noqa: F401  (register MobileSAM / HQ-SAM inference and the model-name resolver)

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "infer_config",
    "load_checkpoint",
    "model_from_state_dict",
    "read_state_dict",
    "save_checkpoint",
]
