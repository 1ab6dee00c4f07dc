"""SAM at inference: the mask decoder's image side prepared once per image embedding and kept in the
embedding's cache, the masks resized from only the low-res rows and columns the image needs. Twin of
segany.modeling.sam.Sam."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import sam as plain
from .cache import tensor_version
from .twin import register


def low_res_region(
    low_size: Sequence[int], image_size: int, input_size: Sequence[int]
) -> Optional[Tuple[int, int, int, int]]:
    """For low-res masks (low_h, low_w) whose sides divide the model's input size: the upsampling factors
    and the low-res rows and columns the un-padded input region (input_size) needs, +1 for the bilinear
    neighbour: (factor_h, factor_w, need_h, need_w). None when the sides do not divide it."""
    low_h, low_w = int(low_size[0]), int(low_size[1])
    if image_size % low_h or image_size % low_w:
        return None
    factor_h, factor_w = image_size // low_h, image_size // low_w
    need_h = min(low_h, -(-int(input_size[0]) // factor_h) + 1)
    need_w = min(low_w, -(-int(input_size[1]) // factor_w) + 1)
    return factor_h, factor_w, need_h, need_w


@dataclass(frozen=True)
class PreparedSideStamp:
    """What a prepared image side was made from, besides the tensors' identities: the in-place
    versions of the image embedding and of the "no mask" embedding (tensor_version), and the
    decoder's (token side, image side) dtypes."""

    versions: Tuple[Optional[int], ...]
    dtypes: Tuple[torch.dtype, torch.dtype]


@dataclass
class PreparedImageSide:
    """The mask decoder's image side prepared for one image embedding, kept in the embedding's cache
    under CACHE_KEY, with what it is valid for: this decoder (a weak reference), this very embedding
    and PE tensor, and the stamp taken when it was made."""

    CACHE_KEY: ClassVar[str] = "mask_decoder_image_side"

    decoder: "weakref.ReferenceType[nn.Module]"
    image_embeddings: torch.Tensor
    image_pe: torch.Tensor
    stamp: PreparedSideStamp
    side: Any  # the decoder's shared_image_side(...): an ImageSide (segany.engine.transformer)

    def serves(self, decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor, stamp: PreparedSideStamp) -> bool:
        return (
            self.decoder() is decoder
            and self.image_embeddings is image_embeddings
            and self.image_pe is image_pe
            and self.stamp == stamp
        )


class Sam(plain.Sam):
    def postprocess_masks(
        self, masks: torch.Tensor, input_size: Tuple[int, ...], original_size: Tuple[int, ...]
    ) -> torch.Tensor:
        """Low-res logits (B, C, 256, 256) -> logits at the original image size (B, C, H, W)."""
        size = self.image_size
        region = low_res_region(masks.shape[-2:], size, input_size)
        if region is not None:
            # Upsample only the low-res rows/columns the un-padded region needs: the same scale, so the
            # same values as upsampling everything and cropping.
            factor_h, factor_w, need_h, need_w = region
            masks = F.interpolate(
                masks[..., :need_h, :need_w],
                scale_factor=(float(factor_h), float(factor_w)),
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
        else:
            masks = F.interpolate(masks, (size, size), mode="bilinear", align_corners=False)
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def decode(
        self,
        features: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        cache: Optional[Dict[str, Any]] = None,
        **options: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the model's input frame -> low-res logits (B, C, 256, 256) and IoU predictions (B, C).

        `features` holds one image's features (batch 1, shared by every prompt) or one per prompt.
        `cache`: a dict kept with these features (segany's ImageEmbedding has one): the decoder's image
        side, the same for every prompt without a mask prompt, is prepared once and kept there.
        Plain SAM takes no decode options; variants do (HQ-SAM: hq_token_only).
        """
        if options:
            raise ValueError(
                f"{type(self).__name__} takes no decode option {', '.join(sorted(options))} "
                "(hq_token_only needs an HQ-SAM checkpoint)"
            )
        return self.run_mask_decoder(features, points, boxes, masks, multimask_output, cache=cache)

    def run_mask_decoder(
        self,
        features: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        cache: Optional[Dict[str, Any]] = None,
        **decoder_inputs: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder, then the mask decoder; variants pass their decoder's extra inputs (and are not
        cached: `cache` serves the plain decoder)."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        image_embeddings, image_pe = features["image_embeddings"], self.prompt_encoder.get_dense_pe()
        if cache is not None and masks is None and not decoder_inputs:
            side = self.cached_image_side(cache, image_embeddings, image_pe, dense)
            if side is not None:  # the decoder reads the prepared side instead of these two
                decoder_inputs["image_side"] = side
                image_embeddings = image_pe = None
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            **decoder_inputs,
        )

    def cached_image_side(
        self, cache: Dict[str, Any], image_embeddings: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
    ) -> Optional[Any]:
        """The mask decoder's prepared image side for this embedding, from `cache` or made and stored
        there; None where the decoder cannot share one (several images, another decoder class)."""
        prepare = getattr(self.mask_decoder, "shared_image_side", None)
        if prepare is None or image_embeddings.shape[0] != 1:
            return None
        stamp = PreparedSideStamp(
            versions=tuple(tensor_version(t) for t in (image_embeddings, self.prompt_encoder.no_mask_embed.weight)),
            dtypes=(self.mask_decoder.token_dtype, self.mask_decoder.image_dtype),
        )
        entry = cache.get(PreparedImageSide.CACHE_KEY)
        if entry is None or not entry.serves(self.mask_decoder, image_embeddings, image_pe, stamp):
            entry = PreparedImageSide(
                decoder=weakref.ref(self.mask_decoder),
                image_embeddings=image_embeddings,
                image_pe=image_pe,
                stamp=stamp,
                side=prepare(image_embeddings, image_pe, dense),
            )
            cache[PreparedImageSide.CACHE_KEY] = entry
        return entry.side


register(plain.Sam, Sam)
