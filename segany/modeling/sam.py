"""The Segment Anything model: image encoder + prompt encoder + mask decoder."""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .cache import tensor_version


PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


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
        if cache is not None and masks is None and not decoder_inputs and not torch.is_grad_enabled():
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
        # Valid while it is this decoder (in its dtype), this very embedding and PE tensor, and neither they
        # nor the "no mask" embedding were modified in place.
        stamp = (
            tuple(tensor_version(t) for t in (image_embeddings, self.prompt_encoder.no_mask_embed.weight)),
            (self.mask_decoder.token_dtype, self.mask_decoder.image_dtype),
        )
        entry = cache.get("mask_decoder_image_side")
        if (
            entry is None
            or entry[0]() is not self.mask_decoder
            or entry[1] is not image_embeddings
            or entry[2] is not image_pe
            or entry[3] != stamp
        ):
            side = prepare(image_embeddings, image_pe, dense)
            entry = (weakref.ref(self.mask_decoder), image_embeddings, image_pe, stamp, side)
            cache["mask_decoder_image_side"] = entry
        return entry[4]

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
