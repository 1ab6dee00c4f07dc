"""FastSAM's (YOLOv8-seg's) inference paths.

exact: the definition as it is, float32 (BatchNorm applied separately).
fast:  a copy with every Conv's BatchNorm folded into the convolution (torch's fuse_conv_bn_weights,
       the same folding the reference applies at predict time), channels-last memory, and with
       `bfloat16=True` the weights and activations in bfloat16 from the second layer on (oneDNN's
       bfloat16 convolutions, about twice the float32 throughput on CPUs with AVX-512 BF16 / AMX).
       The stem convolution stays float32, so the image itself is not rounded to bfloat16 (8 bits of
       mantissa: up to half a grey level), and the box decoding (softmax over bins, anchor offsets of
       up to ~1000 px) runs in float32. Outputs are returned in float32.
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


class CastOutput(nn.Module):
    """A layer whose output is cast to `dtype` (the float32 stem feeding the bfloat16 network)."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).to(self.dtype)


def to_bfloat16(fused: YoloV8Seg) -> YoloV8Seg:
    """Layers 1.. and the head's convolutions in bfloat16; the stem and the DFL (decoding) in float32."""
    layers = fused.model
    for index in range(1, len(layers) - 1):
        layers[index].to(torch.bfloat16)
    head = layers[-1]
    for branch in (head.cv2, head.cv3, head.cv4, head.proto):
        branch.to(torch.bfloat16)
    layers[0] = CastOutput(layers[0], torch.bfloat16)
    return fused


class FastSamEngine:
    """Runs a YoloV8Seg in the chosen mode: (B, 3, H, W) float32 in [0, 1] -> (prediction, protos), float32."""

    def __init__(self, model: YoloV8Seg, mode: str = "exact", bfloat16: bool = True) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode = mode
        self.bfloat16 = bool(bfloat16) and mode == "fast"
        if mode == "fast":
            fused = fuse_conv_bn(model)
            if self.bfloat16:
                fused = to_bfloat16(fused)
            self.network = fused.to(memory_format=torch.channels_last)
        else:
            self.network = model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.inference_mode()
    def __call__(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "exact":
            return self.network(image)
        image = image.float().contiguous(memory_format=torch.channels_last)
        head = self.network.model[22]
        raw, coefs, protos = head.branches(self.network.features(image))
        pred, protos = head.decode([r.float() for r in raw], [c.float() for c in coefs], protos.float())
        return pred, protos.contiguous()
