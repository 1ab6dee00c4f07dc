"""Semantic-SAM: a Swin backbone, a deformable pixel decoder and an interactive decoder that answers each
click with one mask per granularity level and its predicted IoU."""
from __future__ import annotations

from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLICK_BOX_SIZE, SemanticSamConfig
from .decoder import DecoderOutput, InteractiveDecoder
from .pixel_decoder import PixelDecoder
from .swin import SwinTransformer


class ImageFeatures(NamedTuple):
    mask_features: torch.Tensor  # (1, mask_dim, Hp/4, Wp/4)
    multi_scale: List[torch.Tensor]  # strides 8, 16, 32, 64 of the padded image
    image_size: Tuple[int, int]  # (H, W) of the image before padding
    padded_size: Tuple[int, int]  # (Hp, Wp)


class SemSegHead(nn.Module):
    """The released `sem_seg_head`: `pixel_decoder` and `predictor`."""

    def __init__(self, cfg: SemanticSamConfig):
        super().__init__()
        self.pixel_decoder = PixelDecoder(cfg.pixel_decoder, cfg.swin.channels)
        self.predictor = InteractiveDecoder(cfg.decoder, cfg.pixel_decoder.mask_dim)


class SemanticSam(nn.Module):
    def __init__(self, cfg: SemanticSamConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = SwinTransformer(cfg.swin)
        self.sem_seg_head = SemSegHead(cfg)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(-1, 1, 1), persistent=False)

    @property
    def num_levels(self) -> int:
        return self.cfg.decoder.num_mask_tokens

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) RGB 0..255 -> (1, 3, Hp, Wp): normalised, then zero-padded bottom/right to a multiple of 32."""
        x = (image.to(self.pixel_mean) - self.pixel_mean) / self.pixel_std
        d = self.cfg.size_divisibility
        h, w = x.shape[-2:]
        return F.pad(x, (0, (d - w % d) % d, 0, (d - h % d) % d))[None]

    def image_features(self, image: torch.Tensor) -> ImageFeatures:
        """Backbone and pixel decoder on a (3, H, W) RGB 0..255 image (already resized)."""
        x = self.preprocess(image)
        mask_features, multi_scale = self.sem_seg_head.pixel_decoder(self.backbone(x))
        return ImageFeatures(mask_features, multi_scale, tuple(image.shape[-2:]), tuple(x.shape[-2:]))

    def click_boxes(self, points: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
        """(N, 2) clicks (x, y) relative to the image (0..1) -> (1, N, 4) tiny boxes in the padded frame."""
        boxes = torch.cat([points.float(), points.new_full((points.shape[0], 2), CLICK_BOX_SIZE).float()], -1)
        h, w = features.image_size
        hp, wp = features.padded_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        return (boxes * scale / torch.tensor([wp, hp, wp, hp], dtype=torch.float32))[None].to(features.mask_features.device)

    def decode(self, features: ImageFeatures, points: torch.Tensor) -> DecoderOutput:
        """(N, 2) relative clicks -> the decoder's output for N clicks x all granularity tokens (one call:
        all queries attend to each other, as in the release)."""
        boxes = self.click_boxes(points, features)
        is_box = torch.zeros(boxes.shape[:2], dtype=torch.long, device=boxes.device)
        return self.sem_seg_head.predictor(features.multi_scale, features.mask_features, boxes, is_box)

    def upscale(self, lowres: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
        """(B, K, Hp/4, Wp/4) logits -> (B, K, H, W): bilinear to the padded size, then the image's crop."""
        h, w = features.image_size
        return F.interpolate(lowres, size=features.padded_size, mode="bilinear", align_corners=False)[..., :h, :w]

    def forward(self, image: torch.Tensor, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(3, H, W) image, (N, 2) relative clicks -> logits (N, T, H, W) in token order, raw IoU (N, T)."""
        features = self.image_features(image)
        out = self.decode(features, points)
        n, t = out.ious.shape[1:]
        masks = self.upscale(out.masks, features)[0]
        return masks.view(n, t, *masks.shape[-2:]), out.ious[0]
