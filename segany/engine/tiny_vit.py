"""TinyViT (MobileSAM's encoder) at inference: channels-last from the stem on, the MLP's GELU fused into
its first product, bfloat16 window attention with float32 logits on a CPU. Twins of
segany.modeling.tiny_vit's modules."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..modeling import tiny_vit as plain
from .kernels import linear
from .twin import register


class WindowAttention(plain.WindowAttention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B*nW, N, C
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each B*nW, heads, N, head_dim
        bias = self.attention_biases[:, self.bias_index]  # heads, N, N
        if q.dtype == torch.float32 or torch.is_grad_enabled() or not q.is_cpu:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.head_dim**-0.5)
        else:
            # Reduced precision (fast mode) on a CPU: PyTorch's CPU kernel falls back to a generic
            # path for a bfloat16 mask (with scans for fully masked rows); products in bfloat16, the
            # logits, bias and softmax in float32 are both faster and closer to float32.
            logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            out = (logits.float() + bias.float()).softmax(-1).to(v.dtype) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(plain.FeedForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = linear(self.norm(x), self.fc1.weight, self.fc1.bias, activation="gelu")  # fc1, then GELU
        return self.fc2(hidden)


class TinyViT(plain.TinyViT):
    # Channels-last from the start: the convolutions run faster on it and the attention stages'
    # (B, H, W, C) view of it needs no copy.

    def forward_with_interm(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return super().forward_with_interm(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last))


register(plain.WindowAttention, WindowAttention)
register(plain.FeedForward, FeedForward)
register(plain.TinyViT, TinyViT)
