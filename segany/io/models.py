"""`load_model` and the released-style `sam_model_registry`."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ..modeling import SAM_CONFIGS, SamConfig
from ..modeling.tiny_vit import mobile_sam_config
from .checkpoint import build_model, load_checkpoint, model_from_state_dict, read_state_dict
from .device import check_device
from .semantic_sam import is_semantic_sam, load_semantic_sam

PathLike = Union[str, os.PathLike]

# exact: float32, reproduces the released implementation; fast: the engine runs the encoder and the
# decoder bulk in bfloat16 (segany.engine.precision); masks agree closely (docs/benchmarks.md).
MODES = ("exact", "fast")

# A name that is not a file is looked up here (the model zoo registers its resolver).
NAME_RESOLVERS: list = []


def resolve_checkpoint(name_or_path: PathLike) -> Path:
    """A local checkpoint path for a path or a known model name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for resolve in NAME_RESOLVERS:
        resolved = resolve(str(name_or_path))
        if resolved is not None:
            return Path(resolved)
    if path.suffix or os.sep in str(name_or_path):
        raise ValueError(f"checkpoint not found: {path}")
    raise ValueError(f"unknown model {str(name_or_path)!r}: not a file and not a known model name")


def load_model(
    checkpoint: PathLike,
    mode: str = "exact",
    device: Union[str, torch.device] = "cpu",
    config: Optional[SamConfig] = None,
) -> nn.Module:
    """Load a SAM-family model from a checkpoint file or a known model name.

    The architecture (SAM ViT size, MobileSAM, HQ-SAM, FastSAM's YOLOv8-seg, Semantic-SAM; or a CLIP model) is read
    from the state dict itself.
    mode="exact" runs in float32 and reproduces the released implementation; mode="fast" runs the image
    encoder and the mask decoder's bulk (upscaling, MLPs) in bfloat16, its few tokens in float32
    (inference only; see segany.engine.precision). The model returned is the plain float32 definition
    either way; the mode is what the predictors' engine (segany.engine.SamEngine) runs it in.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    device = check_device(device)  # before loading: a bad device is one line, not a traceback
    path = resolve_checkpoint(checkpoint)
    from .clip import load_clip, looks_like_clip  # CLIP (text prompts): OpenAI's archives, open_clip's files

    if config is None and looks_like_clip(path):
        return load_clip(path, mode, device)

    from .fastsam_checkpoint import is_fastsam_file, load_fastsam

    if config is None and is_fastsam_file(path):  # FastSAM (YOLOv8-seg): its engine applies the mode
        model = load_fastsam(path, expect=str(checkpoint).lower()).to(device).eval()
        model.mode = mode
        return model
    sd = read_state_dict(path)
    if is_semantic_sam(sd):  # its own model class (segany.io.semantic_sam)
        return load_semantic_sam(sd, path, name=checkpoint, mode=mode, device=device)
    model = model_from_state_dict(sd, config, source=f"checkpoint {path}")
    model.checkpoint_path = str(path)
    model = model.to(device).eval()
    model.mode = mode
    return model


def _registry_builder(name: str, make_config: Callable[[], SamConfig]) -> Callable[..., nn.Module]:
    def build(checkpoint: Optional[PathLike] = None) -> nn.Module:
        cfg = make_config()
        if checkpoint is None:
            return build_model(cfg).eval()
        sd = read_state_dict(resolve_checkpoint(checkpoint))
        return model_from_state_dict(sd, cfg, source=f"checkpoint {checkpoint}")

    build.__name__ = f"build_sam_{name}"
    build.__doc__ = f"{name}; loads `checkpoint` (released key names) when given."
    return build


class _Registry(dict):
    def __missing__(self, key: str) -> Callable[..., nn.Module]:
        raise ValueError(f"unknown model type {key!r}; known: {', '.join(sorted(self))}")


# sam_model_registry["vit_b"](checkpoint="sam_vit_b_01ec64.pth"), as in the released code; "vit_t" is
# MobileSAM's name for its TinyViT model, as in MobileSAM's registry.
sam_model_registry: Dict[str, Callable[..., nn.Module]] = _Registry(
    {
        "default": _registry_builder("vit_h", lambda: copy.deepcopy(SAM_CONFIGS["vit_h"])),
        **{name: _registry_builder(name, lambda name=name: copy.deepcopy(SAM_CONFIGS[name])) for name in SAM_CONFIGS},
        "vit_t": _registry_builder("vit_t", mobile_sam_config),
    }
)
