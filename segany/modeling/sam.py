"""The Segment Anything model: image encoder + prompt encoder + mask decoder."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not persistent: the released checkpoints do not store them.
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a (B, 3, h, w) resized image and pad it bottom-right to the encoder's square."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        size = self.image_size
        return F.pad(x, (0, size - w, 0, size - h))

    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """Low-res logits (B, C, 256, 256) -> logits at the original image size (B, C, H, W)."""
        size = self.image_size
        masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def encode(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Preprocessed (B, 3, S, S) images -> image features. Variants add entries (HQ-SAM: early features)."""
        return {"image_embeddings": self.image_encoder(images)}

    def decode(
        self,
        features: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        **options: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the model's input frame -> low-res logits (B, C, 256, 256) and IoU predictions (B, C).

        `features` holds one image's features (batch 1, shared by every prompt) or one per prompt.
        Plain SAM takes no decode options; variants do (HQ-SAM: hq_token_only).
        """
        if options:
            raise ValueError(
                f"{type(self).__name__} takes no decode option {', '.join(sorted(options))} "
                "(hq_token_only needs an HQ-SAM checkpoint)"
            )
        return self.run_mask_decoder(features, points, boxes, masks, multimask_output)

    def run_mask_decoder(
        self,
        features: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        **decoder_inputs: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder, then the mask decoder (variants pass their decoder's extra inputs)."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(
            image_embeddings=features["image_embeddings"],
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **decoder_inputs,
        )

    @torch.no_grad()
    def forward(self, batched_input: List[Dict[str, Any]], multimask_output: bool) -> List[Dict[str, torch.Tensor]]:
        """The released end-to-end entry point: a list of per-image dicts with 'image' (3, h, w) already
        resized to the model's long side, 'original_size', and optional 'point_coords', 'point_labels',
        'boxes', 'mask_inputs' in the resized frame."""
        images = torch.stack([self.preprocess(x["image"]) for x in batched_input], dim=0)
        features = self.encode(images)
        outputs = []
        for i, record in enumerate(batched_input):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            one_image = {name: value[i : i + 1] for name, value in features.items()}
            low_res, iou = self.decode(
                one_image, points, record.get("boxes"), record.get("mask_inputs"), multimask_output
            )
            masks = self.postprocess_masks(low_res, record["image"].shape[-2:], record["original_size"])
            outputs.append(
                {"masks": masks > self.mask_threshold, "iou_predictions": iou, "low_res_logits": low_res}
            )
        return outputs
