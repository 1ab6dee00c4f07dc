"""Mask decoder: output tokens + prompt tokens run through the two-way transformer against the
image embedding; the image side is upscaled 4x and each mask token's hypernetwork MLP gives the
weights of a dot product with it; an MLP on the IoU token predicts each mask's quality."""
from __future__ import annotations

from typing import Tuple, Type

import torch
from torch import nn

from .common import MLP, LayerNorm2d


class MaskUpscaling(nn.Sequential):
    """ConvT(2x2, s2) -> LayerNorm2d -> act -> ConvT(2x2, s2) -> act: (B, C, h, w) -> (B, C/8, 4h, 4w).
    The released nn.Sequential (same keys), named for its box in the figure."""


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1  # token 0: single-mask output
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = MaskUpscaling(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (B, 3 or 1, 4h, 4w) and IoU predictions (B, 3 or 1)."""
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def output_tokens(self, batch: int) -> torch.Tensor:
        """The learned output tokens (B, T, C): the IoU token, then the mask tokens (variants add theirs)."""
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        return tokens.unsqueeze(0).expand(batch, -1, -1)

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output tokens after the two-way transformer (B, T, C; prompt tokens dropped) and the
        upscaled image side (B, C/8, 4h, 4w)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = self.output_tokens(batch)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)  # B, T + N, C
        # One image embedding serves every prompt; a per-prompt batch is used as it is.
        src = image_embeddings.expand(batch, -1, -1, -1) if image_embeddings.shape[0] == 1 else image_embeddings
        src = src + dense_prompt_embeddings  # B, C, h, w
        b, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # B, C/8, 4h, 4w
        return hs[:, : output_tokens.shape[1]], upscaled

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Logits of every mask token (B, T, 4h, 4w) and the IoU predictions (B, T)."""
        hs, upscaled = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        iou_token_out, mask_tokens_out = hs[:, 0, :], hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # B, T, C/8
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks, self.iou_prediction_head(iou_token_out)
