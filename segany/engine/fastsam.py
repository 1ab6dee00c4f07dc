"""FastSAM's (YOLOv8-seg's) inference paths.

exact: the definition as it is, float32 (BatchNorm applied separately).
fast:  a copy with every Conv's BatchNorm folded into the convolution (torch's fuse_conv_bn_weights,
       the same folding the reference applies at predict time), channels-last memory, and bfloat16
       autocast for the convolutions when `bfloat16=True`; outputs are returned in float32.
"""
from __future__ import annotations

import copy
from typing import Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..modeling.yolov8_seg import Conv, YoloV8Seg

MODES = ("exact", "fast")


class FusedConv(nn.Module):
    """Conv2d with the BatchNorm folded in (bias), then SiLU."""

    def __init__(self, block: Conv) -> None:
        super().__init__()
        conv, bn = block.conv, block.bn
        self.conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True
        ).requires_grad_(False)
        weight, bias = fuse_conv_bn_weights(
            conv.weight.detach(), None, bn.running_mean, bn.running_var, bn.eps, bn.weight.detach(), bn.bias.detach()
        )
        self.conv.weight.data.copy_(weight)
        self.conv.bias.data.copy_(bias)
        self.act = block.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def fuse_conv_bn(model: YoloV8Seg) -> YoloV8Seg:
    """A copy of `model` with every Conv(+BN+SiLU) replaced by its fused FusedConv."""
    fused = copy.deepcopy(model).eval()
    for parent in list(fused.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv):
                setattr(parent, name, FusedConv(child))
    return fused


class FastSamEngine:
    """Runs a YoloV8Seg in the chosen mode: (B, 3, H, W) float32 in [0, 1] -> (prediction, protos), float32."""

    def __init__(self, model: YoloV8Seg, mode: str = "exact", bfloat16: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.bfloat16 = bool(bfloat16) and mode == "fast"
        if mode == "fast":
            self.network = fuse_conv_bn(model).to(memory_format=torch.channels_last)
        else:
            self.network = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "exact":
            return self.network(image)
        image = image.contiguous(memory_format=torch.channels_last)
        head = self.network.model[22]
        # The convolutions run in bfloat16; the decoding (softmax over bins, anchor offsets of up to
        # ~1000 px) in float32, where bfloat16's 8-bit mantissa would move boxes by pixels.
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
            raw, coefs, protos = head.branches(self.network.features(image))
        pred, protos = head.decode([r.float() for r in raw], [c.float() for c in coefs], protos.float())
        return pred, protos.contiguous()
