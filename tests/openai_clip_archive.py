"""A stand-in for OpenAI's released `ViT-*.pt`, which cannot be downloaded here (tests only).

OpenAI's file is a TorchScript archive made by tracing their `clip.model.CLIP` in float16 (their
`clip.load(jit=True)` patches the traced graphs' device constants and calls `encode_image`,
`encode_text` and `forward` on it; with jit=False it rebuilds the model from the archive's
`state_dict()`, deleting `input_resolution`, `context_length` and `vocab_size` first, then loads
strictly). This module rebuilds that layout, written here from the released architecture:

- classes named `clip.model.{CLIP, VisionTransformer, Transformer, ResidualAttentionBlock, LayerNorm,
  QuickGELU}`, so the archive pickles `__torch__.clip.model.*` objects as OpenAI's does;
- torch's own `nn.MultiheadAttention` (sequence-first), `nn.Sequential` resblocks, an `nn.Sequential`
  MLP of c_fc / gelu / c_proj, the text blocks' causal mask as a plain attribute (`attn_mask`);
- `input_resolution`, `context_length`, `vocab_size` as scalar tensors in the state dict;
- OpenAI's `convert_weights`: float16 for the convolution and linear layers, the attention's in_proj,
  `proj` and `text_projection`; the embeddings, the norms and `logit_scale` stay float32;
- traced with `torch.jit.trace_module` over forward, encode_image and encode_text.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, attn_mask: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNorm(width)
        self.attn_mask = attn_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, B, C), sequence first
        mask = self.attn_mask.to(x.dtype) if self.attn_mask is not None else None
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, attn_mask: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    def __init__(self, resolution: int, patch: int, width: int, layers: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.input_resolution, self.output_dim = resolution, output_dim
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((resolution // patch) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (B, g*g, C)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, resolution: int, patch: int, vision_width: int, vision_layers: int,
                 context_length: int, vocab_size: int, text_width: int, text_heads: int, text_layers: int) -> None:
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(resolution, patch, vision_width, vision_layers, vision_width // 64, embed_dim)
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.transformer = Transformer(text_width, text_layers, text_heads, attn_mask=mask)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
        self.ln_final = LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding.to(self.dtype)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x).to(self.dtype)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection.to(self.dtype)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        a = F.normalize(self.encode_image(image).float(), dim=-1)
        b = F.normalize(self.encode_text(text).float(), dim=-1)
        logits = self.logit_scale.exp() * a @ b.t()
        return logits, logits.t()


for _cls in (LayerNorm, QuickGELU, ResidualAttentionBlock, Transformer, VisionTransformer, CLIP):
    _cls.__module__ = "clip.model"  # the archive then names them __torch__.clip.model.*, as OpenAI's does


def convert_weights(model: nn.Module) -> None:
    """OpenAI's float16 conversion: layers' weights and the projections; embeddings and norms stay float32."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.half()
            module.in_proj_bias.data = module.in_proj_bias.data.half()
        for name in ("text_projection", "proj"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                getattr(module, name).data = getattr(module, name).data.half()


def build(seed: int = 0, resolution: int = 64, patch: int = 16, vision_width: int = 128, layers: int = 2,
          text_width: int = 64, embed_dim: int = 32) -> CLIP:
    """A small CLIP in OpenAI's layout, its weights spread around their initialisation (float32)."""
    torch.manual_seed(seed)
    model = CLIP(embed_dim, resolution, patch, vision_width, layers, 77, 49408, text_width, max(1, text_width // 64), layers)
    with torch.no_grad():
        for p in model.parameters():
            if p is not model.logit_scale:
                p.add_(torch.randn_like(p) * 0.02)
    # The archive keeps these three as scalar tensors in its state dict (OpenAI's loader deletes them).
    del model.context_length, model.vocab_size
    for name, value in (("input_resolution", resolution), ("context_length", 77), ("vocab_size", 49408)):
        model.register_buffer(name, torch.tensor(value))
    return model.eval()


def save_archive(model: CLIP, path) -> None:
    """OpenAI's conversion to float16, then the traced archive (encode_image, encode_text, forward)."""
    convert_weights(model)
    size = int(model.input_resolution)
    image, text = torch.randn(2, 3, size, size), torch.randint(1, 49407, (2, 77))
    text[:, 5] = 49407  # the end-of-text token
    traced = torch.jit.trace_module(
        model, {"forward": (image, text), "encode_image": (image,), "encode_text": (text,)}, check_trace=False
    )
    traced.save(str(path))
