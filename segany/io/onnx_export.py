"""Export a SAM-family model to ONNX: the image encoder, and the prompt encoder + mask decoder.

The decoder graph takes one image's embedding and one prompt, in the convention of the released
ONNX export so existing front ends can use it:
  image_embeddings (1, 256, 64, 64) float32
  point_coords (1, N, 2) float32, in the model's 1024 input frame (x, y)
  point_labels (1, N) float32: 1 foreground, 0 background, 2 / 3 box corners, -1 padding
               (without a box, append one padding point (0, 0) with label -1, as the model was trained)
  mask_input (1, 1, 256, 256) float32 low-res logits, has_mask_input (1,) float32 0 or 1
  orig_im_size (2,) float32 (H, W)
and returns
  masks (1, 4, H, W) logits at the original size, iou_predictions (1, 4), low_res_masks (1, 4, 256, 256);
channel 0 is the single-mask output, 1-3 the multimask outputs.
The encoder graph maps the preprocessed (normalised, padded) image (1, 3, S, S) to the embedding.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.page_graph import PROJECTIONS, PageDecoderGraph, PageImageGraph, embed_points


PathLike = Union[str, os.PathLike]
OPSET = 17


class PromptDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder + mask post-processing as one traceable graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if hasattr(model.mask_decoder, "hf_token"):  # HQ-SAM's decoder (MobileSAM's encoder has forward_with_interm too)
            raise ValueError("HQ-SAM's decoder needs early encoder features; its ONNX export is not supported")
        self.model = model
        self.image_size = model.image_size

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return embed_points(self.model.prompt_encoder, self.image_size, coords, labels)  # 1, N, C

    def decode_low_res(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        """Prompts -> low-res logits (1, 4, 256, 256) and IoU predictions (1, 4)."""
        prompt_encoder = self.model.prompt_encoder
        sparse = self.embed_points(point_coords, point_labels)
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * prompt_encoder.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask
        return self.model.mask_decoder.predict_masks(image_embeddings, prompt_encoder.get_dense_pe(), sparse, dense)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        low_res, iou = self.decode_low_res(image_embeddings, point_coords, point_labels, mask_input, has_mask_input)
        # Post-processing with data-dependent sizes: upsample, crop the padding, resize to the original.
        size = self.image_size
        masks = F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        orig = orig_im_size.to(torch.int64)
        scale = size / torch.max(orig_im_size)
        input_size = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)
        masks = masks[..., : input_size[0], : input_size[1]]
        masks = F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)
        return masks, iou, low_res


class PromptDecoderLowResGraph(PromptDecoderGraph):
    """The same graph without the post-processing: (image_embeddings, point_coords, point_labels,
    mask_input, has_mask_input) -> iou_predictions (1, 4), low_res_masks (1, 4, 256, 256). For a front end
    that upscales only the masks it shows (the annotator's page): the upscaling of four masks to the
    image's size is a large share of the graph's time in WebAssembly."""

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        low_res, iou = self.decode_low_res(image_embeddings, point_coords, point_labels, mask_input, has_mask_input)
        return iou, low_res


class EncoderGraph(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


def _export(module: nn.Module, args: tuple, path: PathLike, input_names, output_names, dynamic_axes) -> Path:
    """torch.onnx.export into a temporary file, then an atomic move to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                args,
                str(tmp_path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        # os.replace is atomic on one file system; a graph over 2 GB comes with external data files.
        for produced in sorted(Path(tmp).iterdir(), key=lambda p: p == tmp_path):
            os.replace(produced, path.parent / produced.name)
    return path


DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")


def export_decoder(model: nn.Module, path: PathLike, low_res_only: bool = False, folded: bool = False,
                   precomputed: bool = False) -> Path:
    """Write the prompt encoder + mask decoder graph (see the module docstring) to `path`;
    `low_res_only`: PromptDecoderLowResGraph (no orig_im_size, no masks output); `folded` (implies
    low_res_only): the same outputs from segany.engine.page_graph.PageDecoderGraph, whose attentions are
    folded for a few tokens (the annotator page's graph: far fewer operations per prompt); `precomputed`
    (implies folded): that graph taking the first block's image-side projections as three more inputs
    (segany.engine.page_graph.PROJECTIONS, made once per image by export_page_image_graph's graph)."""
    if folded or precomputed:
        graph, low_res_only = PageDecoderGraph(model, precomputed=precomputed), True
    else:
        graph = PromptDecoderLowResGraph(model) if low_res_only else PromptDecoderGraph(model)
    pe = model.prompt_encoder
    c, (h, w) = pe.embed_dim, pe.image_embedding_size
    mh, mw = pe.mask_input_size
    args = (
        torch.randn(1, c, h, w),
        torch.randint(0, model.image_size, (1, 5, 2)).float(),
        torch.tensor([[1.0, 0.0, 2.0, 3.0, -1.0]]),
        torch.randn(1, 1, mh, mw),
        torch.tensor([1.0]),
        torch.tensor([480.0, 640.0]),
    )
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}, "masks": {2: "height", 3: "width"}}
    if precomputed:
        del dynamic_axes["masks"]
        with torch.no_grad():
            projections = tuple(PageImageGraph(model)(args[0]))
            return _export(graph, args[:5] + projections, path, DECODER_INPUTS[:5] + PROJECTIONS, DECODER_OUTPUTS[1:], dynamic_axes)
    if low_res_only:
        del dynamic_axes["masks"]
        with torch.no_grad():
            return _export(graph, args[:5], path, DECODER_INPUTS[:5], DECODER_OUTPUTS[1:], dynamic_axes)
    with torch.no_grad():
        return _export(graph, args, path, DECODER_INPUTS, DECODER_OUTPUTS, dynamic_axes)


def export_page_image_graph(model: nn.Module, path: PathLike) -> Path:
    """Write segany.engine.page_graph.PageImageGraph: image_embeddings -> PROJECTIONS, the first block's
    image-side projections that export_decoder(..., precomputed=True)'s graph takes, made once per image."""
    pe = model.prompt_encoder
    with torch.no_grad():
        return _export(PageImageGraph(model), (torch.randn(1, pe.embed_dim, *pe.image_embedding_size),), path,
                       DECODER_INPUTS[:1], PROJECTIONS, None)


def export_encoder(model: nn.Module, path: PathLike) -> Path:
    """Write the image encoder graph: preprocessed image (1, 3, S, S) -> image_embeddings."""
    size = model.image_size
    with torch.no_grad():
        return _export(
            EncoderGraph(model), (torch.randn(1, 3, size, size),), path, ("image",), ("image_embeddings",), None
        )
