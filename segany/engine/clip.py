"""CLIP's fast path: the image tower in bfloat16, fed uint8 crops.

Text selection encodes one crop per candidate mask, so the image tower is where the time goes; the text
tower runs once per phrase and stays float32. Embeddings come back as float32 either way.

What fast mode changes, beside the dtype (docs/text.md states the agreement with float32):
- the patch embedding is one matrix product over the unfolded patches instead of a convolution, and
  takes uint8 crops directly: CLIP's normalisation ((x / 255 - mean) / std) is affine per channel,
  so it is folded into the patch weights and a bias (0-255 are exact in bfloat16);
- the last block runs attention's query, output projection and MLP for the class token only: the
  tower's output is the class token, and no other token's last-block output reaches it;
- LayerNorm straight on bfloat16 (PyTorch's kernel accumulates in float32 itself), QuickGELU folded
  into the MLP's weights as a SiLU;
- on CPU, the linear layers' weights are reordered once into oneDNN's blocked layout and the SiLU runs
  inside the first MLP product (the ops PyTorch's own compiler uses for bfloat16 linear layers);
  elsewhere, or without oneDNN, plain F.linear and a separate SiLU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

FAST_DTYPE = torch.bfloat16
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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


# Rows per product in text selection's batches (32 crops x 50 tokens for ViT-B/32): oneDNN's hint for
# the weight layout; any row count works.
_ROWS_HINT = 32 * 50


def _can_pack(weight: torch.Tensor) -> bool:
    """bfloat16 on a CPU where oneDNN's linear op takes packed weights (kernels.onednn_packed_usable
    checks it computes F.linear with them), unless the oneDNN path is switched off (kernels.ENABLED)."""
    from . import kernels

    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and kernels.ENABLED
            and kernels.onednn_packed_usable(torch.bfloat16))


class _Linear:
    """x @ W.T + b, then the activation ("none" or "swish" = SiLU): with the weight pre-packed for
    oneDNN and the activation fused where _can_pack, else F.linear (and F.silu)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str = "none") -> None:
        self.weight, self.bias, self.activation = weight.detach(), None if bias is None else bias.detach(), activation
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, _ROWS_HINT) if _can_pack(self.weight) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, self.activation, [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.silu(y) if self.activation == "swish" else y


class _BlockLinears:
    def __init__(self, block: nn.Module) -> None:
        attn, mlp = block.attn, block.mlp
        self.qkv = _Linear(attn.in_proj_weight, attn.in_proj_bias)
        self.out = _Linear(attn.out_proj.weight, attn.out_proj.bias)
        folded = isinstance(mlp.gelu, nn.SiLU)  # make_fast folded QuickGELU into a SiLU
        self.fc = _Linear(mlp.c_fc.weight, mlp.c_fc.bias, "swish" if folded else "none")
        self.gelu = None if folded else mlp.gelu
        self.proj = _Linear(mlp.c_proj.weight, mlp.c_proj.bias)


class FastImageTower:
    """The fast image tower over a VisionTransformer's own parameters (no copies but the patch weights,
    reordered for uint8 crops with the normalisation folded in), in the tower's dtype: bfloat16 after
    make_fast; on a float32 tower it computes the released model's embeddings (tests check that)."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.dtype = dtype = visual.conv1.weight.dtype
        self.patch = visual.conv1.kernel_size[0]
        self.grid = visual.image_size // self.patch
        weight = visual.conv1.weight.detach().float()  # (C, 3, P, P)
        std = torch.tensor(CLIP_STD, device=weight.device).view(1, 3, 1, 1)
        mean = torch.tensor(CLIP_MEAN, device=weight.device).view(1, 3, 1, 1)
        # W (x / 255 - mean) / std = (W / (255 std)) x - sum(W mean / std); patches are unfolded (P, P, 3).
        self.uint8_weight = (weight / (255 * std)).permute(0, 2, 3, 1).reshape(weight.shape[0], -1).to(dtype)
        self.uint8_bias = -(weight * mean / std).sum((1, 2, 3)).to(dtype)  # (C,)
        self.weight = weight.reshape(weight.shape[0], -1).to(dtype)  # (C, 3 P P) for normalised pixels
        self.blocks = [(block, _BlockLinears(block)) for block in visual.transformer.resblocks]

    def __reduce__(self):
        # oneDNN's packed weights cannot be copied or pickled: a copy of the model rebuilds its tower.
        return FastImageTower, (self.visual,)

    def embed_uint8(self, crops: torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 crops -> patch tokens (B, g*g, C)."""
        b, g, p = crops.shape[0], self.grid, self.patch
        patches = crops.reshape(b, g, p, g, p, 3).permute(0, 1, 3, 2, 4, 5).to(self.dtype).reshape(b, g * g, p * p * 3)
        return F.linear(patches, self.uint8_weight, self.uint8_bias)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> patch tokens (B, g*g, C)."""
        b, g, p = pixels.shape[0], self.grid, self.patch
        patches = pixels.to(self.dtype).reshape(b, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        return F.linear(patches, self.weight)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, g*g, C) -> image embeddings (B, embed_dim), in the tower's dtype."""
        v = self.visual
        b, _, c = tokens.shape
        cls = v.class_embedding.expand(b, 1, c)
        x = v.ln_pre(torch.cat([cls, tokens], dim=1) + v.positional_embedding)  # (B, N, C)
        for i, (block, linears) in enumerate(self.blocks):
            x = _block(block, linears, x, class_token_only=i == len(self.blocks) - 1)
        return v.ln_post(x[:, 0]) @ v.proj  # (B, embed_dim)


def _block(block: nn.Module, linears: _BlockLinears, x: torch.Tensor, class_token_only: bool) -> torch.Tensor:
    """One pre-norm block; with class_token_only, the output of the class token alone (B, 1, C)."""
    b, n, c = x.shape
    heads = block.attn.heads
    qkv = linears.qkv(block.ln_1(x))  # (B, N, 3C)
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, C/H)
    if class_token_only:
        q, x, n = q[:, :, :1], x[:, :1], 1
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)  # (B, n, C)
    x = x + linears.out(out)
    hidden = linears.fc(block.ln_2(x))  # (B, n, 4C)
    return x + linears.proj(hidden if linears.gelu is None else linears.gelu(hidden))


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
    model.fast_tower = FastImageTower(visual)
    model.mode = "fast"
    return model


def fast_tower(model: nn.Module) -> Optional[FastImageTower]:
    tower = getattr(model, "fast_tower", None)
    if tower is not None and model.visual.conv1.weight.dtype == FAST_DTYPE:
        if tower.uint8_weight.device != model.visual.conv1.weight.device:  # the model moved since make_fast
            tower = model.fast_tower = FastImageTower(model.visual)
        return tower
    return None


def image_dtype(model: nn.Module) -> torch.dtype:
    return model.visual.conv1.weight.dtype


def normalize_crops(crops: torch.Tensor) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) float32 with CLIP's mean and std."""
    pixels = crops.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CLIP_MEAN, device=crops.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=crops.device).view(1, 3, 1, 1)
    return pixels.sub_(mean).div_(std)


def _embedding_dim(model: nn.Module) -> int:
    return model.visual.proj.shape[1]


@torch.inference_mode()
def encode_images(model: nn.Module, pixels: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Preprocessed crops (N, 3, S, S) -> L2-normalised float32 embeddings (N, D), in batches."""
    dtype, device = image_dtype(model), model.visual.conv1.weight.device
    tower = fast_tower(model)
    out = []
    for i in range(0, pixels.shape[0], batch_size):
        batch = pixels[i : i + batch_size].to(device)
        features = tower(tower.embed_pixels(batch)) if tower else model.encode_image(batch.to(dtype))
        out.append(F.normalize(features.float(), dim=-1))
    return torch.cat(out) if out else torch.zeros(0, _embedding_dim(model))


@torch.inference_mode()
def encode_crops(model: nn.Module, crops: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """uint8 crops (N, S, S, 3), resized and centre-cropped but not normalised -> L2-normalised float32
    embeddings (N, D). Fast mode feeds them to the patch product as they are; exact mode normalises them
    in float32 first, as CLIP's preprocessing does."""
    if not len(crops):
        return torch.zeros(0, _embedding_dim(model))
    tower, device = fast_tower(model), model.visual.conv1.weight.device
    out = []
    for i in range(0, crops.shape[0], batch_size):
        batch = crops[i : i + batch_size].to(device)
        if tower is None:
            out.append(encode_images(model, normalize_crops(batch), batch_size))
        else:
            out.append(F.normalize(tower(tower.embed_uint8(batch)).float(), dim=-1))
    return torch.cat(out)


@torch.inference_mode()
def encode_texts(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (N, 77) -> L2-normalised float32 text embeddings (N, D)."""
    return model.encode_text(tokens.to(model.logit_scale.device), normalize=True).float()
