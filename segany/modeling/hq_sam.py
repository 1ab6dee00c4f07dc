"""HQ-SAM (Ke et al., 2023): SAM plus a High-Quality output token.

    early ViT feature (after the first global block) --compress_vit_feat (2x ConvT)--+
    final image embedding ----------------------------embedding_encoder (2x ConvT)---+--> HQ feature
                                                                                         (B, 32, 256, 256)
    decoder tokens: [IoU | 4 SAM mask tokens | HQ token | prompt tokens] -> two-way transformer
    SAM masks  = hypernetwork(mask tokens) . upscaled decoder features
    HQ mask    = hf_mlp(HQ token)          . (embedding_maskfeature(upscaled) + HQ feature)

The output is the SAM mask (the best of the three when multimask) plus the HQ mask, or the HQ mask
alone with `hq_token_only=True`. Everything of SAM is reused unchanged; names follow the release.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .build import ENCODER_BUILDERS, build_mask_decoder, build_prompt_encoder
from .common import MLP, LayerNorm2d
from .config import SAM_CONFIGS, SamConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .sam import Sam


class ImageEncoderViTWithInterm(ImageEncoderViT):
    """SAM's ViT that also returns the output of its first global-attention block (same weights)."""

    @property
    def interm_dim(self) -> int:
        return self.config.embed_dim

    def forward_with_interm(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Embedding (B, 256, 64, 64) and the early feature (B, C, 64, 64)."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        interm: Optional[torch.Tensor] = None
        for block in self.blocks:
            x = block(x)
            if interm is None and block.window_size == 0:
                interm = x
        if interm is None:
            raise ValueError("HQ-SAM needs a ViT with at least one global-attention block")
        return self.neck(x.permute(0, 3, 1, 2)), interm.permute(0, 3, 1, 2)


class MaskDecoderHQ(MaskDecoder):
    def __init__(self, *, vit_dim: int, **decoder_args) -> None:
        super().__init__(**decoder_args)
        dim = self.transformer_dim
        self.hf_token = nn.Embedding(1, dim)  # the HQ output token
        self.hf_mlp = MLP(dim, dim, dim // 8, 3)  # its hypernetwork
        # Global-local fusion: early ViT feature and final embedding, each upscaled 4x to C/8 channels.
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(vit_dim, dim, kernel_size=2, stride=2),
            LayerNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim // 8, kernel_size=2, stride=2),
        )
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
        )
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(dim // 8, dim // 4, 3, 1, 1),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.Conv2d(dim // 4, dim // 8, 3, 1, 1),
        )

    def output_tokens(self, batch: int) -> torch.Tensor:
        sam_tokens = super().output_tokens(batch)  # B, 1 + num_mask_tokens, C
        return torch.cat([sam_tokens, self.hf_token.weight.unsqueeze(0).expand(batch, -1, -1)], dim=1)

    def hq_features(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor) -> torch.Tensor:
        """(B_img, 256, 64, 64) + (B_img, C_vit, 64, 64) -> (B_img, 32, 256, 256)."""
        return self.embedding_encoder(image_embeddings) + self.compress_vit_feat(interm_embeddings)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        interm_embeddings: Optional[torch.Tensor] = None,
        hq_token_only: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, 1, 256, 256) and IoU (B, 1): HQ-SAM always returns one mask per prompt."""
        if interm_embeddings is None:
            raise ValueError("HQ-SAM's decoder needs the early image-encoder features (interm_embeddings)")
        fused = self.hq_features(image_embeddings, interm_embeddings)
        sam_masks, hq_mask, iou = self.predict_masks_hq(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, fused
        )
        if multimask_output:
            # SAM's three ambiguity-aware masks collapse to the one with the best predicted IoU.
            iou, best = iou[:, 1:].max(dim=1, keepdim=True)
            sam_mask = torch.gather(sam_masks[:, 1:], 1, best[:, :, None, None].expand(-1, -1, *sam_masks.shape[-2:]))
        else:
            iou, sam_mask = iou[:, :1], sam_masks[:, :1]
        masks = hq_mask if hq_token_only else sam_mask + hq_mask
        return masks, iou

    def predict_masks_hq(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM masks (B, 4, 256, 256), HQ mask (B, 1, 256, 256), IoU predictions (B, 4)."""
        hs, upscaled = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hq_token_out = hs[:, 1 + self.num_mask_tokens, :]

        upscaled_hq = self.embedding_maskfeature(upscaled) + hq_features  # B, C/8, 4h, 4w
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # B, 4, C/8
        b, c, h, w = upscaled.shape
        sam_masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)  # B, 4, 4h, 4w
        hq_mask = (self.hf_mlp(hq_token_out)[:, None] @ upscaled_hq.view(b, c, h * w)).view(b, 1, h, w)
        return sam_masks, hq_mask, self.iou_prediction_head(iou_token_out)


class HqSam(Sam):
    """Sam whose features include the early encoder feature and whose decoder has the HQ token."""

    # What decode() does when not told: False (SAM's mask + the HQ mask) as released; set it to True
    # to make every caller that passes no decode options (everything mode, the server) HQ-only.
    hq_token_only: bool = False

    def encode(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        embeddings, interm = self.image_encoder.forward_with_interm(images)
        return {"image_embeddings": embeddings, "interm_embeddings": interm}

    def decode(
        self,
        features: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        hq_token_only: Optional[bool] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """As Sam.decode; returns one mask per prompt. `hq_token_only` returns the HQ mask alone."""
        if "interm_embeddings" not in features:
            raise ValueError(
                "HQ-SAM needs the early image-encoder features as well as the image embedding: "
                "embed the image with this model (set_image / embed) instead of passing a stored embedding"
            )
        return self.run_mask_decoder(
            features,
            points,
            boxes,
            masks,
            multimask_output,
            interm_embeddings=features["interm_embeddings"],
            hq_token_only=self.hq_token_only if hq_token_only is None else bool(hq_token_only),
        )

    @torch.no_grad()
    def forward(self, batched_input, multimask_output: bool, hq_token_only: bool = False):
        """The released HQ-SAM entry point: Sam.forward with the `hq_token_only` option."""
        default = self.hq_token_only
        self.hq_token_only = hq_token_only
        try:
            return super().forward(batched_input, multimask_output)
        finally:
            self.hq_token_only = default


def build_hq_sam(cfg: SamConfig) -> HqSam:
    """An untrained HQ-SAM on the ViT (`encoder_kind="vit"`) or TinyViT (`"tiny_vit"`) encoder."""
    if cfg.encoder_kind == "vit":
        encoder = ImageEncoderViTWithInterm(cfg.encoder)
    elif cfg.encoder_kind in ENCODER_BUILDERS:
        encoder = ENCODER_BUILDERS[cfg.encoder_kind](cfg.encoder)
        if not hasattr(encoder, "forward_with_interm"):
            raise ValueError(f"encoder kind {cfg.encoder_kind!r} does not provide the early feature HQ-SAM needs")
    else:
        raise ValueError(f"unknown encoder kind {cfg.encoder_kind!r}; known: {', '.join(ENCODER_BUILDERS)}")
    decoder = build_mask_decoder(cfg, MaskDecoderHQ, vit_dim=encoder.interm_dim)
    model = HqSam(image_encoder=encoder, prompt_encoder=build_prompt_encoder(cfg), mask_decoder=decoder)
    model.config = cfg
    return model.eval()


def hq_sam_config(name: str) -> SamConfig:
    """The released HQ-SAM models: "vit_b", "vit_l", "vit_h" (SAM's ViTs) and "vit_tiny" (Light HQ-SAM)."""
    if name == "vit_tiny":
        from .tiny_vit import mobile_sam_config

        cfg = mobile_sam_config()
    elif name in SAM_CONFIGS:
        cfg = copy.deepcopy(SAM_CONFIGS[name])
    else:
        raise ValueError(f"unknown HQ-SAM size {name!r}; known: vit_b, vit_l, vit_h, vit_tiny")
    cfg.variant = "hq"
    return cfg
