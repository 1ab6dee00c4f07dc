"""Convolutions for inference on the CPU through oneDNN, with what follows them fused.

A convolution followed by a GELU, or by a residual add, runs as one oneDNN primitive with the GELU
(or the add) as its post-op: the output is written once, while it is still in cache, instead of being
read and written again by a separate pass. Results equal F.conv2d followed by the operation up to
float rounding (oneDNN's own GELU and summation order). `conv2d` is for the engine's inference on a
CPU (no autograd, no tracing: training and export run the plain modules; an engine built for another
device runs the plain modules' convolutions, segany.engine.paths).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .kernels import ACTIVATIONS, ONEDNN_DTYPES, onednn_supports


@functools.lru_cache(maxsize=None)
def fused_conv_usable(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution and it computes what F.conv2d does."""
    try:
        if not onednn_supports(dtype):
            return False
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8, 6, 6, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(8, 1, 3, 3, generator=generator).to(dtype)
        b = torch.randn(8, generator=generator).to(dtype)
        r = torch.randn(1, 8, 3, 3, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            ops = torch.ops.mkldnn._convolution_pointwise
            got = ops(x, w, b, [1, 1], [2, 2], [1, 1], 8, "gelu", [], "none")
            summed = ops.binary(x, r, w, b, [1, 1], [2, 2], [1, 1], 8, "add", None, None, [], None)
            conv = F.conv2d(x.float(), w.float(), b.float(), 2, 1, 1, 8)
        return bool(
            torch.allclose(got.float(), F.gelu(conv), rtol=2e-2, atol=2e-2)
            and torch.allclose(summed.float(), conv + r.float(), rtol=2e-2, atol=2e-2)
        )
    except (AttributeError, RuntimeError):
        return False


def _fusable(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    if x.dtype not in ONEDNN_DTYPES or weight.dtype != x.dtype or x.dim() != 4:
        return False
    if residual is not None and (residual.dtype != x.dtype or residual.dim() != 4):
        return False
    return fused_conv_usable(x.dtype)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    groups: int = 1,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """activation(conv2d(x, weight, bias)), or conv2d(x, weight, bias) + residual (not both).

    x: (B, C, H, W), fastest in channels-last memory (the output then is too); activation None or
    "gelu" (the exact, erf one); residual: the output's shape."""
    if activation not in (None,) + ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {ACTIVATIONS}")
    if activation is not None and residual is not None:
        raise ValueError("conv2d fuses an activation or a residual, not both")
    stride, padding = list(stride), list(padding)
    if not _fusable(x, weight, residual):
        y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
        if activation == "gelu":
            y = F.gelu(y)
        return y if residual is None else y + residual
    ops = torch.ops.mkldnn._convolution_pointwise
    if residual is not None:
        memory = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        residual = residual.contiguous(memory_format=memory)
        return ops.binary(x, residual, weight, bias, padding, stride, [1, 1], groups, "add", None, None, [], None)
    return ops(x, weight, bias, padding, stride, [1, 1], groups, activation or "none", [], "none")
