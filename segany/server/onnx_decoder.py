"""The model's prompt decoder as ONNX for the page, and image embeddings in a compact form.

The page decodes clicks itself (ONNX Runtime Web) with the graph `segany export-onnx` writes, less
its post-processing: prompt encoder + mask decoder -> IoU predictions and the four 256x256 low-res
logits; the page upscales the masks it shows itself (the same two bilinear steps as the server), which
saves the graph upscaling four masks to the image's size. For SAM's decoders the graph is
segany.engine.page_graph.PageDecoderGraph (the attentions folded for a few tokens: the same logits
with far fewer operations), else segany.io.onnx_export.PromptDecoderLowResGraph. For SAM's decoders the
prompt graph takes the first two-way block's image-side projections as inputs, and a second graph
(segany.engine.page_graph.PageImageGraph, "<key>-image") makes them from the embedding once per image.
The server exports them once per model and keeps them at <data>/decoders/<key>.onnx (and
<key>-image.onnx), written atomically; <key> is the checkpoint's content hash (a model without a file:
the hash of its prompt encoder's and decoder's weights) and the graph's kind ("-precomputed", "-lowres").

Embeddings travel as a safetensors file (an 8-byte header length, a JSON header with dtype, shape and
offsets, the raw little-endian data) holding "image_embeddings" (1, 256, 64, 64) in float16 by default,
with the sizes the decoder needs (original_size, input_size) in its metadata.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..engine.page_graph import PROJECTIONS, page_graph_unsupported
from ..predict import ImageEmbedding

log = logging.getLogger("segany.server")

EMBEDDING_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# The graph's kind is in its key, so that a data folder's graphs of another kind are never served as
# this one: "precomputed" (segany.engine.page_graph with its once-per-image graph, the SAM decoders),
# "folded" (the same without the once-per-image graph: session 13's, and what PRECOMPUTE_FIRST_BLOCK =
# False serves), "lowres" where a decoder has no folded graph.
PRECOMPUTE_FIRST_BLOCK = True  # the first block's image-side projections made once per image
GRAPH_KIND = "precomputed" if PRECOMPUTE_FIRST_BLOCK else "folded"
PLAIN_GRAPH_KIND = "lowres"
IMAGE_GRAPH_SUFFIX = "-image"


def decoder_unavailable_reason(model: Any) -> Optional[str]:
    """Why the model's decoder cannot run in the page, or None when it can."""
    if not all(hasattr(model, name) for name in ("prompt_encoder", "mask_decoder", "image_encoder")):
        return f"{type(model).__name__} has no SAM prompt decoder to export"
    if hasattr(model.mask_decoder, "hf_token"):  # MobileSAM's TinyViT has forward_with_interm too: not a sign of HQ
        return "HQ-SAM's decoder needs the encoder's early features; it has no ONNX export, so clicks decode on the server"
    return None


def _weights_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for part in (model.prompt_encoder, model.mask_decoder):
        for name, value in sorted(part.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
    return "weights-" + digest.hexdigest()[:16]


class DecoderExport:
    """The ONNX decoder of one model, exported on first use and cached on disk."""

    def __init__(self, model: Any, cache_dir: Path, checkpoint: Optional[Path], checkpoint_hash: Optional[str]) -> None:
        self.model = model
        self.cache_dir = Path(cache_dir)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.reason = decoder_unavailable_reason(model)
        self.folded = self.reason is None and page_graph_unsupported(model) is None
        self._key = checkpoint_hash
        self._lock = threading.Lock()
        self._error: Optional[str] = None

    @property
    def available(self) -> bool:
        return self.reason is None and self._error is None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = _weights_hash(self.model)
        return f"{self._key}-{GRAPH_KIND if self.folded else PLAIN_GRAPH_KIND}"

    @property
    def path(self) -> Path:
        return self.cache_dir / f"{self.key}.onnx"

    @property
    def image_key(self) -> Optional[str]:
        """The once-per-image graph's key (SAM's decoders), or None."""
        return self.key + IMAGE_GRAPH_SUFFIX if self.folded and PRECOMPUTE_FIRST_BLOCK else None

    def keys(self) -> tuple:
        return (self.key,) if self.image_key is None else (self.key, self.image_key)

    def describe(self) -> Dict[str, Any]:
        if not self.available:
            return {"available": False, "reason": self.reason or self._error}
        projections = list(PROJECTIONS) if self.image_key is not None else []
        described = {
            "available": True,
            "url": f"/api/decoder/{self.key}.onnx",
            "key": self.key,
            "inputs": ["image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", *projections],
            "outputs": ["iou_predictions", "low_res_masks"],  # the page upscales the masks it shows
            "image_size": int(self.model.image_size),
            "low_res_size": list(self.model.prompt_encoder.mask_input_size),
            "embedding_shape": [1, int(self.model.prompt_encoder.embed_dim), *self.model.prompt_encoder.image_embedding_size],
            "mask_threshold": float(getattr(self.model, "mask_threshold", 0.0)),
        }
        if self.image_key is not None:
            # run once per image on the embedding; its outputs are the prompt graph's last inputs
            described["image_graph"] = {"url": f"/api/decoder/{self.image_key}.onnx", "key": self.image_key,
                                        "inputs": ["image_embeddings"], "outputs": projections}
        return described

    def _exportable_model(self) -> torch.nn.Module:
        if getattr(self.model, "fast_dtype", None) is None:
            return self.model
        # The fast mode's casts are not exportable; the exact model has the same weights.
        if self.checkpoint is None or not self.checkpoint.is_file():
            raise RuntimeError("the server runs the fast mode without a checkpoint file to export the exact decoder from")
        from ..io.models import load_model

        return load_model(self.checkpoint, mode="exact")

    def ensure(self, key: Optional[str] = None) -> Path:
        """The path of the graph with this key (default: the prompt graph), exporting the model's graphs
        first if they are not on disk yet."""
        if not self.available:
            raise RuntimeError(self.reason or self._error)
        key = key or self.key
        if key not in self.keys():
            raise KeyError(key)
        with self._lock:
            paths = {k: self.cache_dir / f"{k}.onnx" for k in self.keys()}
            if all(path.is_file() for path in paths.values()):
                return paths[key]
            from ..io.onnx_export import export_decoder, export_page_image_graph

            try:
                log.info("exporting the ONNX prompt decoder to %s", self.path)
                model = self._exportable_model()
                # atomic: a temporary file, then a rename; the image graph first, so that a prompt graph on
                # disk always has its image graph beside it
                if self.image_key is not None:
                    export_page_image_graph(model, paths[self.image_key])
                export_decoder(model, self.path, low_res_only=True, folded=self.folded,
                               precomputed=self.image_key is not None)
            except Exception as exc:  # the page falls back to server decoding and says why
                log.exception("ONNX decoder export failed")
                self._error = f"the decoder's ONNX export failed: {exc}"
                raise RuntimeError(self._error) from None
            return paths[key]


def embedding_file(embedding: ImageEmbedding, dtype: str) -> bytes:
    """The embedding as safetensors bytes with the sizes the decoder needs in the metadata."""
    from safetensors.torch import save

    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(EMBEDDING_DTYPES)}, got {dtype!r}")
    tensor = embedding.image_embeddings.detach().float().cpu()
    if dtype == "float16":
        finite = torch.isfinite(tensor).all() and tensor.abs().max() <= float(np.finfo(np.float16).max)
        if not finite:
            raise ValueError("the embedding does not fit float16; ask for dtype=float32")
    tensor = tensor.to(EMBEDDING_DTYPES[dtype]).contiguous()
    (h, w), (ih, iw) = embedding.original_size, embedding.input_size
    meta = {"original_size": f"{h},{w}", "input_size": f"{ih},{iw}"}
    return save({"image_embeddings": tensor}, metadata=meta)
