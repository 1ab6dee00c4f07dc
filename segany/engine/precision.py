"""The `fast` mode: the image encoder and the mask decoder's bulk run in bfloat16.

On a CPU with AVX-512 BF16 (or AMX) a bfloat16 matrix product runs at more than twice the float32
rate and moves half the bytes. What stays float32:
- the prompt encoder (random-Fourier features of pixel coordinates: sin/cos of values up to ~100 rad),
- the mask decoder's tokens' side: a few tokens through small layers, where a bfloat16 product is no
  faster (its kernels pack their operands on every call) and every cast is a dispatch; only the
  decoder's bulk (MaskDecoder.bulk_modules: what runs over the image positions, and the transformer's
  MLPs, most of its weight bytes) is converted. The products between the tokens and the image side
  run in bfloat16, their results come back to the tokens in float32,
- layer norms' statistics and softmax accumulate in float32 inside PyTorch's kernels,
- the interfaces: the encoder returns float32 embeddings (interchangeable with exact mode's, storable)
  and the decoder float32 logits and scores; inputs are cast on the way in.
(segany.predict's Segmenter also resizes fast-mode masks to the image with OpenCV.)
The engine casts at its boundaries (SamEngine.encode and decode; the decoder casts its image side
itself), so variants (MobileSAM, HQ-SAM with its early features) get the same treatment without code
of their own. The engine's twin of the model holds the converted weights (rounded to bfloat16, same
names); the model itself stays float32, the plain definition that training and export use.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .twin import own_weights_in

FAST_DTYPE = torch.bfloat16


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 matrix products (otherwise bf16 is emulated and slower)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) to `dtype`; everything else unchanged."""
    if torch.is_tensor(value):
        if not value.is_floating_point() or value.dtype == dtype:
            return value
        if value.dim() and 0 in value.stride() and value.numel() > 1:
            # A broadcast (expanded) tensor, like the one "no mask" embedding for every prompt: cast
            # its distinct values and expand again, so the decoder still sees one shared image side.
            distinct = tuple(slice(0, 1) if st == 0 else slice(None) for st in value.stride())
            return value[distinct].to(dtype).expand(value.shape)
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def _run_in(dtype: torch.dtype, method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return cast_floats(method(*cast_floats(args, dtype), **cast_floats(kwargs, dtype)), torch.float32)

    return wrapped


def make_fast(model: nn.Module) -> nn.Module:
    """Mark `model` for the fast mode: engines built from it (segany.engine.SamEngine, and so every
    predictor) run it in bfloat16. The model's own weights are not changed. Returns the model."""
    model.mode = "fast"
    return model


def model_mode(model: nn.Module) -> str:
    """The mode a model was loaded or marked for: "exact" unless load_model(mode="fast") or make_fast."""
    return getattr(model, "mode", None) or "exact"


def convert_twin(net: nn.Module, dtype: torch.dtype = FAST_DTYPE) -> None:
    """The fast mode's precision policy on an engine twin (segany.engine.twin): the image encoder and
    the mask decoder's bulk get bfloat16 weights of their own; a decoder that does not split its sides
    is converted whole, its inputs cast on the way in."""
    own_weights_in(net.image_encoder, dtype)
    decoder = net.mask_decoder
    if not hasattr(decoder, "bulk_modules"):
        own_weights_in(decoder, dtype)
        decoder.forward = _run_in(dtype, decoder.forward)
        return
    for module in decoder.bulk_modules():
        own_weights_in(module, dtype)
