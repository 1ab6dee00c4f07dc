"""Image-embedding cache on disk for training with a frozen encoder.

Key: the encoder's fingerprint (a hash of its weights and class) + the hash of the exact model-frame
image (uint8 pixels and valid size), so an augmented view gets its own entry and a different or
changed encoder never reuses another's embeddings.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..engine import SamEngine
from ..io.atomic import atomic_write_bytes


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over the class name, parameter/buffer names, shapes, dtypes and values."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def image_key(frame: torch.Tensor, size: Tuple[int, int]) -> str:
    """Hash of a (3, S, S) uint8 frame's valid (h, w) region."""
    h, w = size
    data = frame[:, :h, :w].contiguous().numpy().tobytes()
    return hashlib.sha256(f"{h}x{w}:".encode() + data).hexdigest()


def encode_frame(model: nn.Module, frame: torch.Tensor, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """A (3, S, S) uint8 frame (image at the top-left, `size` valid) -> the model's features, batch 1."""
    h, w = size
    x = frame[:, :h, :w].float()[None].to(model.device)
    return model.encode(model.preprocess(x))


@torch.no_grad()
def infer_frame(model: nn.Module, frame: torch.Tensor, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """encode_frame at inference (nothing to differentiate): through the inference engine."""
    h, w = size
    x = frame[:, :h, :w].float()[None].to(model.device)
    return SamEngine(model).encode(model.preprocess(x))


class EmbeddingCache:
    """Features of a frozen encoder, stored as one small torch file per (encoder, image)."""

    def __init__(self, model: nn.Module, folder: Union[str, Path]) -> None:
        self.model = model
        self.fingerprint = module_fingerprint(model.image_encoder)
        self.folder = Path(folder) / self.fingerprint[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def path(self, frame: torch.Tensor, size: Tuple[int, int]) -> Path:
        return self.folder / f"{image_key(frame, size)}.pt"

    @torch.no_grad()
    def get(self, frame: torch.Tensor, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        path = self.path(frame, size)
        if path.is_file():
            try:
                features = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                return features
            except Exception:  # a damaged entry: recompute it
                pass
        self.misses += 1
        features = {k: v.detach().to("cpu").contiguous() for k, v in infer_frame(self.model, frame, size).items()}
        buffer = io.BytesIO()
        torch.save(features, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return features


def cached_or_fresh(cache: Optional[EmbeddingCache], model: nn.Module, frame: torch.Tensor, size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    if cache is not None:
        return cache.get(frame, size)
    return infer_frame(model, frame, size)
