"""CLIP's fast path: the image tower in bfloat16 (its LayerNorms still compute in float32).

Text selection encodes one crop per candidate mask, so the image tower is where the time goes; the text
tower runs once per phrase and stays float32. Embeddings come back as float32 either way.
"""
from __future__ import annotations

import torch
from torch import nn

FAST_DTYPE = torch.bfloat16


def make_fast(model: nn.Module) -> nn.Module:
    """Cast the image tower to bfloat16 in place (inference only)."""
    model.visual.to(FAST_DTYPE)
    model.mode = "fast"
    return model


def image_dtype(model: nn.Module) -> torch.dtype:
    return model.visual.conv1.weight.dtype


@torch.inference_mode()
def encode_images(model: nn.Module, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Preprocessed crops (N, 3, S, S) -> L2-normalised float32 embeddings (N, D), in batches."""
    dtype, device = image_dtype(model), model.visual.conv1.weight.device
    out = [
        model.encode_image(pixels[i : i + batch_size].to(device, dtype), normalize=True).float()
        for i in range(0, pixels.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, model.visual.proj.shape[1])


@torch.inference_mode()
def encode_texts(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (N, 77) -> L2-normalised float32 text embeddings (N, D)."""
    return model.encode_text(tokens.to(model.logit_scale.device), normalize=True).float()
