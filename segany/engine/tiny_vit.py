"""TinyViT (MobileSAM's encoder) at inference. Twins of segany.modeling.tiny_vit's modules.

- Convolutions: each BatchNorm folded into its convolution once (kept until the weights change), the
  GELU after a convolution and the MBConv's residual add run as the convolution's oneDNN post-ops
  (segany.engine.conv), channels-last from the stem on.
- Attention blocks: the layer norm and the qkv projection on the image's positions only (a padded
  position's qkv is a constant: the layer norm maps a zero token to its bias); with the compiled
  kernels, one call attends every window and head, reading q, k, v from the projection's rows and
  writing to the image's rows (csrc/attention_softmax.c: logits, offset bias and softmax in float32,
  never in memory); without them, one copy cuts the windows and splits the heads, the windows'
  attention runs in chunks that stay in cache, one copy puts the output back in image order. The
  output projection and the MLP's second layer add their residual as they write, the MLP's GELU is
  fused into its first layer.
- The neck's layer norms run over the channels-last map's last axis.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import common as plain_common
from ..modeling import tiny_vit as plain
from .cache import kept_until_changed
from .conv import conv2d
from .image_encoder import window_index, window_regions
from .kernels import linear
from .rel_pos_softmax import QkvLayout, attention_rows
from .twin import UNBOUND, chosen_at_build, register

# Logits of windowed attention computed at once (1 MB in float32: they stay in cache).
WINDOW_CHUNK_ELEMENTS = 1 << 18
# An MBConv's hidden map is computed in bands of rows of about this many elements (it is 4x the
# block's width: 16.8 M elements at vit_t's 256x256 stage 0, fresh pages from the OS on every call
# if it were allocated whole); the bands stay in cache from one convolution to the next.
BAND_ELEMENTS = 1 << 21
# An MLP over more positions than this runs in row chunks, its hidden activations small likewise.
MLP_CHUNK_ROWS = 1024


def _is_exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"


class ConvBN(plain.ConvBN):
    paths = UNBOUND

    def folded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The convolution's weight and bias with the BatchNorm folded in (computed in float32, in the
        weights' dtype), kept until any of the weights changes."""
        conv, bn = self.c, self.bn

        def build() -> Tuple[torch.Tensor, torch.Tensor]:
            scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
            weight = conv.weight.float() * scale.view(-1, 1, 1, 1)
            bias = bn.bias.float() - bn.running_mean.float() * scale
            return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)

        tensors = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
        return kept_until_changed(self, "_segany_folded", tensors, build)

    def forward(
        self, x: torch.Tensor, activation: Optional[str] = None, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """activation(conv-BN(x)), or conv-BN(x) + residual."""
        # (self.training: the mode of the model the twin was built from; a BatchNorm in training
        # mode normalises by the batch's statistics, which no folded weight holds)
        if self.training or not self.paths.cpu:
            y = super().forward(x)
            if activation == "gelu":
                y = F.gelu(y)
            return y if residual is None else y + residual
        weight, bias = self.folded()
        c = self.c
        return conv2d(x, weight, bias, c.stride, c.padding, c.groups, activation=activation, residual=residual)


class Stem(plain.Stem):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, act, second = self.seq
        x = first(x, activation="gelu") if _is_exact_gelu(act) else act(first(x))
        return second(x)


def _gelu_in_place(y: torch.Tensor, cpu: bool) -> torch.Tensor:
    return torch.ops.aten.gelu_(y) if cpu else F.gelu(y)


class MBConv(plain.MBConv):
    paths = UNBOUND

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, C, H, W (channels-last)
        b, c, h, w = x.shape
        hidden = self.conv1.c.out_channels
        band = max(1, BAND_ELEMENTS // (hidden * w))
        depthwise = self.conv2.c
        if band >= h or depthwise.stride != (1, 1) or not self.paths.cpu or x.dim() != 4:
            return self.band(x, x, 0, h)
        # In bands of rows: each band's hidden map from its rows and the depthwise kernel's halo.
        x = x.contiguous(memory_format=torch.channels_last)  # a band of rows is then one block of memory
        out = torch.empty_like(x)
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            out[:, :, r0:r1] = self.band(x, x[:, :, r0:r1], r0, r1)
        return out

    def band(self, x: torch.Tensor, shortcut: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """The block's output rows r0:r1 (shortcut: x's rows r0:r1)."""
        halo = self.conv2.c.padding[0]
        a0, a1 = max(0, r0 - halo), min(x.shape[2], r1 + halo)
        y = self.conv1(x if (a0, a1) == (0, x.shape[2]) else x[:, :, a0:a1], activation="gelu")
        # The depthwise convolution pads each band as the whole map: rows at a band's inner edge
        # come from its halo, those at the map's edge from the padding, as in one pass.
        y = self.conv2(y, activation="gelu")
        if (a0, a1) != (r0, r1):
            y = y[:, :, r0 - a0 : r0 - a0 + r1 - r0]
        # oneDNN takes no GELU after a fused add: the last GELU is one in-place pass
        return _gelu_in_place(self.conv3(y, residual=shortcut), self.paths.cpu)


class PatchMerging(plain.PatchMerging):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x, activation="gelu")
        x = self.conv2(x, activation="gelu")
        return self.conv3(x)


class WindowAttention(plain.WindowAttention):
    paths = UNBOUND
    # bfloat16 on a CPU: the windows' attention in chunks (attend); float32 or elsewhere: PyTorch's fused kernel.
    chunked_attention = chosen_at_build(lambda m, paths: paths.cpu and m.qkv.weight.dtype != torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B*nW, N, C
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each B*nW, heads, N, head_dim
        if not self.chunked_attention:
            bias = self.attention_biases[:, self.bias_index]  # heads, N, N
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=self.head_dim**-0.5)
        else:
            out = torch.empty_like(q)
            self.attend(q, k, v, out)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    def offset_bias(self) -> torch.Tensor:
        """The learned bias of every query/key pair of a window, (heads, N, N) float32, kept until changed."""
        return kept_until_changed(
            self, "_segany_offset_bias", [self.attention_biases], lambda: self.attention_biases[:, self.bias_index].float()
        )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """out = softmax((q * scale) k^T + bias) v for q, k, v (windows, heads, N, head_dim), a chunk of
        windows at a time: the logits, the bias and the softmax in float32, the products in q's dtype
        (PyTorch's fused kernel takes a slower generic path for a bfloat16 mask)."""
        windows, heads, n, _ = q.shape
        bias = self.offset_bias()
        scale = self.head_dim**-0.5
        step = max(1, WINDOW_CHUNK_ELEMENTS // (heads * n * n))
        for start in range(0, windows, step):
            part = slice(start, min(windows, start + step))
            logits = torch.matmul(q[part] * scale, k[part].transpose(-2, -1)).float()
            probs = logits.add_(bias).softmax(-1).to(v.dtype)
            torch.matmul(probs, v[part], out=out[part])

    def padded_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """The qkv row of a position in the zero padding, (1, heads * 3 * head_dim): a zero token through the
        layer norm is the norm's bias."""
        norm_bias = self.norm.bias if self.norm.bias is not None else x.new_zeros(x.shape[-1])
        return linear(norm_bias.to(x.dtype)[None], self.qkv.weight, self.qkv.bias)

    def attend_windows(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """x + attention within non-overlapping windows, x zero-padded to whole windows as released
        (inference). (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        n_h, n_w = -(-h // window), -(-w // window)
        product = linear(self.norm(x), self.qkv.weight, self.qkv.bias)  # B, H, W, heads * 3 * head_dim
        # With the compiled kernels (a CPU build's paths.attention_kernels; bfloat16 or float32): each window's
        # attention read from the qkv rows and written to the image's rows in place, no copies around it.
        kernels = self.paths.attention_kernels
        if kernels is not None and product.is_contiguous():
            out = x.new_empty(b, h, w, heads * head_dim)
            index = window_index(b, h, w, window, x.device)
            if attention_rows(
                kernels, product.view(b * h * w, -1), self.padded_qkv(x).view(-1), index, heads,
                QkvLayout.tiny_vit(heads, head_dim), head_dim**-0.5, out.view(b * h * w, -1), bias=self.offset_bias(),
            ):
                return linear(out, self.proj.weight, self.proj.bias, residual=x)
        product = product.view(b, h, w, heads, 3, head_dim)
        windows = product.new_empty(3, b, n_h, n_w, heads, window, window, head_dim)
        grid = windows.permute(0, 1, 2, 5, 3, 6, 4, 7)  # 3, B, n_h, ws (y), n_w, ws (x), heads, head_dim
        for (y0, y1, iy, ny, ry), (x0, x1, ix, nx, rx) in window_regions(h, w, window):
            src = product[:, y0:y1, x0:x1].view(b, ny, ry, nx, rx, heads, 3, head_dim).permute(6, 0, 1, 2, 3, 4, 5, 7)
            grid[:, :, iy : iy + ny, :ry, ix : ix + nx, :rx].copy_(src)
        pads = (grid[:, :, -1:, h - (n_h - 1) * window :], grid[:, :, :, :, -1:, w - (n_w - 1) * window :])
        if any(p.numel() for p in pads):
            # A zero-padded token through the layer norm is the norm's bias; its q, k, v a constant.
            padded = self.padded_qkv(x).view(heads, 3, head_dim).transpose(0, 1).reshape(3, 1, 1, 1, 1, 1, heads, head_dim)
            for p in pads:
                if p.numel():
                    p.copy_(padded.expand(p.shape))
        q, k, v = windows.view(3, b * n_h * n_w, heads, window * window, head_dim).unbind(0)
        mixed = torch.empty_like(q)
        self.attend(q, k, v, mixed)
        mixed = mixed.view(b, n_h, n_w, heads, window, window, head_dim)
        out = x.new_empty(b, h, w, heads, head_dim)
        for (y0, y1, iy, ny, ry), (x0, x1, ix, nx, rx) in window_regions(h, w, window):
            region = mixed[:, iy : iy + ny, ix : ix + nx, :, :ry, :rx].permute(0, 1, 4, 2, 5, 3, 6)
            out[:, y0:y1, x0:x1].view(b, ny, ry, nx, rx, heads, head_dim).copy_(region)
        # The output projection acts on each position alone: after the windows are undone it skips
        # the padding, and the residual is added as it is written.
        return linear(out.view(b, h, w, c), self.proj.weight, self.proj.bias, residual=x)


class FeedForward(plain.FeedForward):
    paths = UNBOUND

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """fc2(GELU(fc1(norm(x)))), plus `residual` when given (added as the product is written)."""
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows <= 2 * MLP_CHUNK_ROWS or not self.paths.cpu:
            hidden = self.paths.linear(self.norm(x), self.fc1.weight, self.fc1.bias, activation="gelu")  # fc1, then GELU
            return self.paths.linear(hidden, self.fc2.weight, self.fc2.bias, residual=residual)
        # Row chunks: the (rows, 4C) hidden activations stay small (see MLPBlock in engine/common.py).
        flat = self.norm(x).reshape(rows, x.shape[-1])
        flat_residual = None if residual is None else residual.reshape(rows, self.fc2.out_features)
        out = flat.new_empty(rows, self.fc2.out_features)
        for r0 in range(0, rows, MLP_CHUNK_ROWS):
            chunk = slice(r0, r0 + MLP_CHUNK_ROWS)
            hidden = linear(flat[chunk], self.fc1.weight, self.fc1.bias, activation="gelu")
            shortcut = None if flat_residual is None else flat_residual[chunk]
            out[chunk] = linear(hidden, self.fc2.weight, self.fc2.bias, residual=shortcut)
        return out.view(*x.shape[:-1], self.fc2.out_features)


class TinyViTBlock(plain.TinyViTBlock):
    paths = UNBOUND

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, H, W, C
        if not self.paths.cpu:
            return super().forward(x)
        x = self.attn.attend_windows(x.contiguous(), self.window)
        # A contiguous (B, H, W, C) map is a channels-last (B, C, H, W) one: no copy either way.
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return self.mlp(x, residual=x)


class TinyViT(plain.TinyViT):
    paths = UNBOUND
    # Channels-last from the start: the convolutions run faster on it and the attention stages'
    # (B, H, W, C) view of it needs no copy.

    def forward_with_interm(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))
        interm = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == 1:
                interm = x
        return self.run_neck(x), interm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x.contiguous(memory_format=torch.channels_last))  # B, C0, S/4, S/4
        for layer in self.layers:
            x = layer(x)
        return self.run_neck(x)  # B, 256, S/16, S/16

    def run_neck(self, x: torch.Tensor) -> torch.Tensor:
        """The neck (1x1 conv, LN, 3x3 conv, LN); at inference the layer norms over the channels-last
        map's last axis (one pass each) and the convolutions through oneDNN."""
        layers = list(self.neck)
        kinds = [type(m) for m in layers]
        plain_convs = all(
            c.dilation == (1, 1) and c.padding_mode == "zeros" and not isinstance(c.padding, str) for c in layers[::2]
        )
        if kinds != [nn.Conv2d, plain_common.LayerNorm2d] * 2 or not plain_convs or not self.paths.cpu:
            return self.neck(x)
        x = x.contiguous(memory_format=torch.channels_last)
        for conv, norm in zip(layers[::2], layers[1::2]):
            x = conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.groups)
            rows = x.permute(0, 2, 3, 1)  # B, H, W, C: contiguous
            x = F.layer_norm(rows, rows.shape[-1:], norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
        return x


register(plain.ConvBN, ConvBN)
register(plain.Stem, Stem)
register(plain.MBConv, MBConv)
register(plain.PatchMerging, PatchMerging)
register(plain.WindowAttention, WindowAttention)
register(plain.FeedForward, FeedForward)
register(plain.TinyViTBlock, TinyViTBlock)
register(plain.TinyViT, TinyViT)
