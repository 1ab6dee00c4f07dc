"""Load Semantic-SAM checkpoints strictly.

The released files (`swint_only_sam_many2many.pth`, `swinl_only_sam_many2many.pth`) hold detectron2's
`{'model': {'model.backbone...': tensor, ...}, ...trainer state}`; the reference keeps the `model.`
keys, strips that prefix and silently skips keys whose name or shape does not fit. Here every key must
be used and every shape must fit; aliased names of one shared tensor must hold the same values.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..modeling.semantic_sam import SemanticSam, SemanticSamConfig, infer_config, is_semantic_sam_state_dict
from ..modeling.semantic_sam.swin import relative_position_index
from .checkpoint import check_state_dict
from .errors import CheckpointError

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

PREFIX = "model."
SIZE_NAMES = {"t": "Swin-T", "l": "Swin-L"}
# A zoo name or released file name says which size it must be.
_SIZE_IN_NAME = re.compile(r"(?:semantic[-_]sam[-_]|^swin)([tl])(?:$|[_.])", re.IGNORECASE)


def strip_prefix(sd: StateDict) -> StateDict:
    """The released `model.`-prefixed keys without the prefix; a flat dict without it is taken as is."""
    if any(k.startswith(PREFIX) for k in sd):
        others = [k for k in sd if not k.startswith(PREFIX)]
        if others:
            raise CheckpointError(f"unexpected key {others[0]!r} beside the model.-prefixed Semantic-SAM keys")
        return {k[len(PREFIX):]: v for k, v in sd.items()}
    return dict(sd)


def is_semantic_sam(sd: StateDict) -> bool:
    return is_semantic_sam_state_dict(strip_prefix(sd)) if sd else False


def expected_size(name: object) -> Optional[str]:
    """'t' / 'l' when a model name or file name says the size (semantic-sam-t, swinl_only_...pth)."""
    m = _SIZE_IN_NAME.search(Path(str(name)).name)
    return m.group(1).lower() if m else None


def _check_aliases(model: SemanticSam, sd: StateDict, source: object) -> None:
    """Names that the module shares (decoder_norm = decoder.norm, one box head for all layers) must agree."""
    by_tensor: Dict[int, list] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), []).append(key)
    for names in by_tensor.values():
        first = sd[names[0]]
        for other in names[1:]:
            if not torch.equal(first, sd[other]):
                raise CheckpointError(f"{source}: {other!r} should be the same tensor as {names[0]!r} but differs")


def _check_index_buffers(sd: StateDict, source: object) -> None:
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            w = round((value.shape[0]) ** 0.5)
            if not torch.equal(value.long(), relative_position_index(w)):
                raise CheckpointError(f"{source}: {key!r} is not the Swin relative-position index of window {w}")


def semantic_sam_from_state_dict(
    sd: StateDict, config: Optional[SemanticSamConfig] = None, source: object = "checkpoint",
    size: Optional[str] = None,
) -> SemanticSam:
    """A float32 SemanticSam in eval mode; `size` ('t' / 'l') when the name promises one."""
    sd = strip_prefix(sd)
    if not is_semantic_sam_state_dict(sd):
        raise CheckpointError(f"{source} is not a Semantic-SAM checkpoint")
    try:
        cfg = config if config is not None else infer_config(sd)
    except ValueError as exc:  # the definition says what does not fit; this layer says it of a checkpoint
        raise CheckpointError(f"{source}: {exc}") from None
    if size is not None and cfg.size_name != size:
        found = SIZE_NAMES.get(cfg.size_name, f"a Swin of embed {cfg.swin.embed_dim}, depths {list(cfg.swin.depths)}")
        raise CheckpointError(f"{source} holds Semantic-SAM {found}, not {SIZE_NAMES[size]} as its name says")
    # Built without initialising its weights (every one is replaced), then given the checkpoint's tensors.
    with torch.device("meta"):
        model = SemanticSam(cfg)
    check_state_dict(model, sd, source)
    _check_aliases(model, sd, source)
    _check_index_buffers(sd, source)
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    model.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
    model.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {left[0]!r} was not loaded")
    return model.eval()


def load_semantic_sam(
    sd: StateDict, path: PathLike, name: object = None, mode: str = "exact", device: Union[str, torch.device] = "cpu"
) -> SemanticSam:
    """What `segany.load_model` returns for a Semantic-SAM checkpoint (exact float32 only)."""
    if mode != "exact":
        raise ValueError(f"mode {mode!r} is not available for Semantic-SAM; use mode='exact'")
    size = expected_size(name) if name is not None else None
    model = semantic_sam_from_state_dict(sd, source=f"checkpoint {path}", size=size or expected_size(path))
    model.checkpoint_path = str(path)
    model.mode = mode
    return model.to(device).eval()
