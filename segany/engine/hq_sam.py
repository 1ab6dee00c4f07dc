"""HQ-SAM at inference: the HQ fusion in the decoder's image dtype, the SAM masks' hypernetwork
product through the engine's mask decoder. Twins of segany.modeling.hq_sam's modules."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..modeling import hq_sam as plain
from .mask_decoder import MaskDecoder, mask_logits
from .sam import Sam
from .twin import register


class MaskDecoderHQ(MaskDecoder, plain.MaskDecoderHQ):
    def hq_features(self, image_embeddings: torch.Tensor, interm_embeddings: torch.Tensor) -> torch.Tensor:
        """(B_img, 256, 64, 64) + (B_img, C_vit, 64, 64) -> (B_img, 32, 256, 256)."""
        dtype = self.image_dtype
        return self.embedding_encoder(image_embeddings.to(dtype)) + self.compress_vit_feat(interm_embeddings.to(dtype))

    def bulk_modules(self) -> List[nn.Module]:
        """SAM's, and the HQ fusion's convolutions over the image (see MaskDecoder.bulk_modules)."""
        return super().bulk_modules() + [self.compress_vit_feat, self.embedding_encoder, self.embedding_maskfeature]

    # The released forward, resolved to the HQ definition's (the engine's MaskDecoder comes first in the
    # MRO and would otherwise answer with SAM's): it calls this class's hq_features and predict_masks_hq.
    forward = plain.MaskDecoderHQ.forward

    def predict_masks_hq(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAM masks (B, 4, 256, 256), HQ mask (B, 1, 256, 256), IoU predictions (B, 4)."""
        batch = sparse_prompt_embeddings.shape[0]
        hs, upscaled = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hq_token_out = hs[:, 1 + self.num_mask_tokens, :]

        upscaled_hq = self.embedding_maskfeature(upscaled) + self.expand_to_batch(hq_features, batch)
        sam_masks = mask_logits(self.hypernetwork_weights(mask_tokens_out), upscaled)  # B, 4, 4h, 4w
        hq_mask = mask_logits(self.hf_mlp(hq_token_out).unsqueeze(1), upscaled_hq)  # B, 1, 4h, 4w
        return sam_masks, hq_mask, self.iou_prediction_head(iou_token_out)


class HqSam(Sam, plain.HqSam):
    """Sam whose features include the early encoder feature and whose decoder has the HQ token."""

    def decode(
        self,
        features: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        hq_token_only: Optional[bool] = None,
        cache: Optional[Dict[str, Any]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """As Sam.decode; returns one mask per prompt. `hq_token_only` returns the HQ mask alone.
        `cache` is accepted for the common signature; HQ-SAM's decoder prepares its image side per call."""
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


register(plain.MaskDecoderHQ, MaskDecoderHQ)
register(plain.HqSam, HqSam)
