"""The shared blocks at inference: MLPs in row chunks with fused activation and residual, small
bfloat16 MLPs as float32 products. Twins of segany.modeling.common's blocks."""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import common as plain
from .kernels import float32_copy, fusable_activation, linear
from .twin import UNBOUND, register


class MLPBlock(plain.MLPBlock):
    """Transformer feed-forward block: lin1 -> act -> lin2."""

    # Inference over more positions than this runs in row chunks (see forward).
    CHUNK_ROWS = 1024
    paths = UNBOUND

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """lin2(act(lin1(x))), plus `residual` when given (added as each chunk is computed)."""
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if rows <= 2 * self.CHUNK_ROWS or not self.paths.cpu:
            # In the weights' dtype, one cast each way around the whole block (the fast mode's float32
            # tokens through a bfloat16 MLP; no-ops where the dtypes agree).
            y = self.lin2(self.act(self.lin1(x.to(self.lin1.weight.dtype)))).to(x.dtype)
            return y if residual is None else residual + y
        # Row chunks keep the (rows, mlp_dim) hidden activations small: for a 64x64 image they are
        # 50 MB (vit_b), and an allocation that size is fresh zeroed pages from the OS in every block
        # (on a CPU; a GPU runs the whole at once). Each row's arithmetic is unchanged.
        flat = x.reshape(rows, x.shape[-1])
        flat_residual = None if residual is None else residual.reshape(rows, self.lin2.out_features)
        out = flat.new_empty(rows, self.lin2.out_features)
        fused = fusable_activation(self.act)  # applied by the product's kernel as it writes
        for r0 in range(0, rows, self.CHUNK_ROWS):
            chunk = slice(r0, r0 + self.CHUNK_ROWS)
            hidden = linear(flat[chunk], self.lin1.weight, self.lin1.bias, activation=fused)
            if fused is None:
                hidden = self.act(hidden)
            shortcut = None if flat_residual is None else flat_residual[chunk]
            out[chunk] = linear(hidden, self.lin2.weight, self.lin2.bias, residual=shortcut)
        return out.view(*x.shape[:-1], self.lin2.out_features)


class MLP(plain.MLP):
    """Plain MLP with ReLU between layers (hypernetwork heads, IoU head)."""

    paths = UNBOUND

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self.num_layers - 1
        dtype = x.dtype
        # A few bfloat16 rows (the IoU token) run the whole MLP as float32 products of the same values,
        # cast once each way (see kernels.float32_weight_for).
        in_float32 = self.paths.float32_weight_for(x, self.layers[0].weight) is not None
        if in_float32:
            x = x.float()
        for i, layer in enumerate(self.layers):
            if in_float32:
                x = F.linear(x, float32_copy(layer.weight), float32_copy(layer.bias))
            else:
                x = layer(x)
            if i < last:
                x = torch.relu(x)
        if self.sigmoid_output:
            x = torch.sigmoid(x)
        return x.to(dtype) if in_float32 else x


register(plain.MLPBlock, MLPBlock)
register(plain.MLP, MLP)
