"""CLIP's fast path: the image tower in bfloat16.

Text selection encodes one crop per candidate mask, so the image tower is where the time goes; the text
tower runs once per phrase and stays float32. Embeddings come back as float32 either way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FAST_DTYPE = torch.bfloat16


class _NativeLayerNorm(nn.LayerNorm):
    """LayerNorm straight on bfloat16 tensors: PyTorch's kernel accumulates in float32 itself, so the
    released float32 round trip (two full copies per norm) is not needed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


# QuickGELU(h) = h * sigmoid(1.702 h) = silu(1.702 h) / 1.702: the factor goes into c_fc's weights and
# its inverse into c_proj's, leaving one fused SiLU instead of three elementwise passes.
_QUICK_GELU = 1.702


@torch.no_grad()
def _fold_quick_gelu(mlp: nn.Module) -> None:
    mlp.c_fc.weight.mul_(_QUICK_GELU)
    mlp.c_fc.bias.mul_(_QUICK_GELU)
    mlp.c_proj.weight.div_(_QUICK_GELU)
    mlp.gelu = nn.SiLU()


def make_fast(model: nn.Module) -> nn.Module:
    """The image tower in bfloat16, its norms without float32 copies, QuickGELU folded into SiLU
    (in place; inference only). The text tower stays float32."""
    from ..modeling.clip import LayerNorm, Mlp

    visual = model.visual
    for module in visual.modules():
        if isinstance(module, Mlp) and not isinstance(module.gelu, nn.SiLU):
            _fold_quick_gelu(module)
        if isinstance(module, LayerNorm):
            module.__class__ = _NativeLayerNorm
    visual.to(FAST_DTYPE)
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
