"""CLIP (Radford et al., 2021): a vision transformer and a text transformer projected into one space.

The ViT variants OpenAI released (ViT-B/32, B/16, L/14, L/14@336), with OpenAI's state-dict key names,
so that their checkpoints and open_clip's checkpoints of the same layout load strictly:

    visual.conv1 / class_embedding / positional_embedding / ln_pre / transformer.resblocks.N / ln_post / proj
    token_embedding / positional_embedding / transformer.resblocks.N / ln_final / text_projection / logit_scale

The released weights were trained with QuickGELU (x * sigmoid(1.702 x)), so that is the activation here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ClipVisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12


@dataclass
class ClipTextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8


@dataclass
class ClipConfig:
    embed_dim: int = 512
    vision: ClipVisionConfig = None  # type: ignore[assignment]
    text: ClipTextConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.vision = self.vision or ClipVisionConfig()
        self.text = self.text or ClipTextConfig()


# OpenAI's released ViTs; the architecture of a checkpoint is read from its tensors (config_from_state_dict).
CLIP_CONFIGS: Dict[str, ClipConfig] = {
    "ViT-B-32": ClipConfig(512, ClipVisionConfig(224, 32, 768, 12, 12), ClipTextConfig(77, 49408, 512, 12, 8)),
    "ViT-B-16": ClipConfig(512, ClipVisionConfig(224, 16, 768, 12, 12), ClipTextConfig(77, 49408, 512, 12, 8)),
    "ViT-L-14": ClipConfig(768, ClipVisionConfig(224, 14, 1024, 24, 16), ClipTextConfig(77, 49408, 768, 12, 12)),
    "ViT-L-14-336": ClipConfig(768, ClipVisionConfig(336, 14, 1024, 24, 16), ClipTextConfig(77, 49408, 768, 12, 12)),
}


class QuickGELU(nn.Module):
    """The GELU approximation the released weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as the released model does for fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class MultiheadAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names (in_proj_weight, out_proj)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, c = x.shape  # (B, N, C)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3C)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, C/H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, C/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """Image (B, 3, S, S) -> embedding (B, embed_dim): the class token's output, normalised and projected."""

    def __init__(self, cfg: ClipVisionConfig, embed_dim: int) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width ** -0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)  # (B, C, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + g*g, C)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, embed_dim)


class CLIP(nn.Module):
    """OpenAI's CLIP with a ViT image tower; the text tower's modules sit at the top level, as released.

    Text: token ids (B, 77) -> the end-of-text token's output under a causal mask, projected. The
    end-of-text token has the largest id in the vocabulary, so argmax finds it in every row.
    """

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        self.config = cfg
        self.context_length = cfg.text.context_length
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        text = cfg.text
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads)
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))  # log(1 / 0.07)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=text.width ** -0.5)
        # Position i attends to positions <= i: -inf above the diagonal. Not a checkpoint tensor.
        mask = torch.full((text.context_length, text.context_length), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) -> image embeddings (B, embed_dim)."""
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Token ids (B, context_length) -> text embeddings (B, embed_dim)."""
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]  # (B, n, C)
        x = self.transformer(x, self.attn_mask[:n, :n].to(x.dtype))
        x = self.ln_final(x)
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, C)
        features = eot @ self.text_projection  # (B, embed_dim)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(pixels, normalize=True), self.encode_text(tokens, normalize=True), self.logit_scale.exp()


# ---------------------------------------------------------------- architecture from the state dict


def _count_blocks(sd: Dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in sd for m in [pattern.match(key)] if m}
    return max(indices) + 1 if indices else 0


def is_clip_state_dict(sd: Dict[str, torch.Tensor]) -> bool:
    return "visual.conv1.weight" in sd and "text_projection" in sd and "token_embedding.weight" in sd


def config_from_state_dict(sd: Dict[str, torch.Tensor]) -> ClipConfig:
    """Every size of a ViT CLIP from its tensors; heads are width / 64 as in all released models."""
    patch = sd["visual.conv1.weight"]  # (width, 3, p, p)
    width, patch_size = patch.shape[0], patch.shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision = ClipVisionConfig(
        image_size=grid * patch_size, patch_size=patch_size, width=width,
        layers=_count_blocks(sd, "visual.transformer.resblocks."), heads=max(1, width // 64),
    )
    text_width = sd["ln_final.weight"].shape[0]
    text = ClipTextConfig(
        context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width, layers=_count_blocks(sd, "transformer.resblocks."), heads=max(1, text_width // 64),
    )
    return ClipConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text)


def build_clip(cfg: ClipConfig) -> CLIP:
    return CLIP(cfg)
