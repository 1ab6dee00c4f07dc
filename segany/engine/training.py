"""The training twin: the same model, the same math, faster under autograd.

`training_twin(model)` gives a twin of a SAM-family model (segany.engine.twin: the model's own
parameters, so gradients land in them) whose mask-decoder modules compute the plain definition's
outputs with fewer operations, differentiably:

- the cross-attentions between a few tokens and the image positions fold the image side's
  projection into the tokens' side ((q W_k^T) . x instead of q . (x W_k^T), and P (x W_v^T) =
  (P x) W_v^T; the image-to-token softmax over each head's few keys with the positions vectorised),
  so no (positions x C) projection of the image is formed, nor its gradient; other attentions run
  through torch's scaled_dot_product_attention;
- the output upscaling's 2x2, stride-2 transposed convolutions run channels-last as matrix products
  (each input pixel owns its output block), its norm as a layer norm over the last axis;
- the mask decoder meets the hypernetwork weights with each position's block of upscaled features
  and shuffles only the mask logits into image order, for the mask tokens the call returns.

The products are the plain ones in another order, so losses and gradients equal the plain modules'
up to float32 rounding (tests/test_training_twin.py). The plain modules (segany.modeling) stay what
training means; `segany.train` runs the twin unless told not to (TrainConfig.training_twin).
The twin's modules that change are its own objects (their train()/eval() state is their own: call
the twin's), every other module is the model's.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import mask_decoder as plain_decoder
from ..modeling import transformer as plain_transformer
from .mask_decoder import conv_transpose_2x2, conv_transpose_2x2_blocks
from .twin import twin

# Attention with at most this many keys per query side counts as "few tokens" against the image:
# heads * tokens below the internal width and the other side at least this many times longer.
_MANY_TO_FEW = 8


class Attention(plain_transformer.Attention):
    """softmax(Q K^T / sqrt(d)) V per head, with the projections folded into the few tokens' side
    when one side is a few tokens and the other the image."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_q, n_k = q.shape[1], k.shape[1]
        if self.num_heads * n_k < self.internal_dim and n_q >= _MANY_TO_FEW * n_k:
            return self.image_to_tokens(q, k, v)
        if self.num_heads * n_q < self.internal_dim and n_k >= _MANY_TO_FEW * n_q:
            return self.tokens_to_image(q, k, v)
        q_heads = self._separate_heads(self.q_proj(q))
        out = F.scaled_dot_product_attention(
            q_heads, self._separate_heads(self.k_proj(k)), self._separate_heads(self.v_proj(v))
        )  # (its default scale is 1/sqrt(d))
        return self.out_proj(self._recombine_heads(out))

    def _scaled_heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """proj(x) per head (B, H, N, d) times 1/sqrt(d): the scale on the few tokens' side."""
        heads = self._separate_heads(proj(x))
        return heads * (heads.shape[-1] ** -0.5)

    def _folded(self, heads: torch.Tensor, proj: nn.Linear):
        """proj folded into heads (B, H, N, d): rows (B, H*N, C) and biases (B, H*N, 1) with
        rows . x + biases = heads . proj(x) per head, for any x (C)."""
        n_heads, head_dim = heads.shape[1], heads.shape[3]
        rows = (heads @ proj.weight.view(n_heads, head_dim, -1)).flatten(1, 2)
        biases = (heads * proj.bias.view(n_heads, 1, head_dim)).sum(-1).flatten(1, 2).unsqueeze(-1)
        return rows, biases

    def tokens_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A few queries (tokens) q (B, Nq, C) on many keys (image) k, v (B, Nk, C): k, v never projected."""
        heads, head_dim, dim = self.num_heads, self.internal_dim // self.num_heads, self.embedding_dim
        rows, biases = self._folded(self._scaled_heads(q, self.q_proj), self.k_proj)  # B, H*Nq, C
        probs = (rows @ k.transpose(1, 2) + biases).softmax(-1)  # B, H*Nq, Nk
        mixed = (probs @ v).view(probs.shape[0], heads, q.shape[1], dim)  # B, H, Nq, C: P x
        # (P x) W_v^T + b_v per head: the rows of P sum to 1
        out = mixed @ self.v_proj.weight.view(heads, head_dim, dim).transpose(1, 2) + self.v_proj.bias.view(heads, 1, head_dim)
        return self.out_proj(self._recombine_heads(out))

    def image_to_tokens(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Many queries (image) q (B, Nq, C) on a few keys (tokens) k, v (B, Nk, C): q never projected,
        nor the attention's output per position before out_proj's product. With `residual` (B, Nq, C):
        residual + the attention, in the same product."""
        heads, n_k, dim = self.num_heads, k.shape[1], self.embedding_dim
        rows, biases = self._folded(self._scaled_heads(k, self.k_proj), self.q_proj)  # B, H*Nk, C
        logits = rows @ q.transpose(1, 2) + biases  # B, H*Nk, Nq
        batch = logits.shape[0]
        # Each head's softmax over its few keys, reduced across rows with the positions vectorised.
        probs = logits.view(batch, heads, n_k, -1).softmax(2).view(batch, heads * n_k, -1)
        v_heads = self._separate_heads(self.v_proj(v))  # B, H, Nk, d
        out_weight = self.out_proj.weight.view(dim, heads, -1).permute(1, 2, 0)  # H, d, C
        values_out = (v_heads @ out_weight).flatten(1, 2)  # B, H*Nk, C: each head's values through out_proj
        if residual is None:
            return torch.baddbmm(self.out_proj.bias.expand(batch, 1, dim), probs.transpose(1, 2), values_out)
        # Each head's probabilities sum to 1: the output bias rides on the values (bias / heads per
        # head) and the residual is the product's accumulator.
        values_out = values_out + self.out_proj.bias / heads
        return torch.baddbmm(residual.expand(batch, -1, -1), probs.transpose(1, 2), values_out)


class TwoWayAttentionBlock(plain_transformer.TwoWayAttentionBlock):
    """The plain block's steps; the image side's keys + PE formed once, and the image-to-token
    attention's residual added inside its product."""

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        queries = self.token_self_attention(queries, query_pe)

        q, k = queries + query_pe, keys + key_pe  # (keys do not change before the image-to-token step)
        queries = self.norm2(queries + self.cross_attn_token_to_image(q=q, k=k, v=keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        i2t = self.cross_attn_image_to_token
        if isinstance(i2t, Attention) and i2t.num_heads * q.shape[1] < i2t.internal_dim and k.shape[1] >= _MANY_TO_FEW * q.shape[1]:
            keys = self.norm4(i2t.image_to_tokens(k, q, queries, residual=keys))
        else:
            keys = self.norm4(keys + i2t(q=k, k=q, v=queries))
        return queries, keys


class MaskUpscaling(plain_decoder.MaskUpscaling):
    """ConvT(2x2, s2) -> LayerNorm2d -> act -> ConvT(2x2, s2) -> act, channels-last inside; returns a
    channels-last-strided NCHW view (B, C/8, 4h, 4w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up1, norm, act1, up2, act2 = self
        x = conv_transpose_2x2(x.permute(0, 2, 3, 1), up1)  # B, 2h, 2w, C/4
        x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = act2(conv_transpose_2x2(x, up2))  # B, 4h, 4w, C/8
        return x.permute(0, 3, 1, 2)


class MaskDecoder(plain_decoder.MaskDecoder):
    """The plain decoder's steps, with the output upscaling's features kept in blocks: each image
    position's 4x4 block of upscaled features (channels-last products, see MaskUpscaling) meets the
    hypernetwork weights there, and only the mask logits are shuffled into image order; and only for
    the mask tokens the call returns (the plain decoder drops the others' logits)."""

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([self.output_tokens(batch), sparse_prompt_embeddings], dim=1)  # B, T + N, C
        src = image_embeddings.expand(batch, -1, -1, -1) if image_embeddings.shape[0] == 1 else image_embeddings
        src = src + dense_prompt_embeddings  # B, C, h, w
        b, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe, tokens)  # keys: B, h*w, C
        selected = slice(1, self.num_mask_tokens) if multimask_output else slice(0, 1)
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens]
        # Every hypernetwork runs (a few tokens each), so that the unused ones get the zero gradients
        # the plain decoder gives them (an optimizer's weight decay treats zero and no gradient apart).
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )[:, selected]  # B, T', C/8
        up1, norm, act1, up2, act2 = self.output_upscaling
        x = conv_transpose_2x2_blocks(keys.view(b, h, w, c), up1)  # B, h, w, (dy1, dx1), C/4
        x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = act2(conv_transpose_2x2_blocks(x, up2))  # B, h, w, (dy1, dx1), (dy2, dx2), C/8
        logits = hyper_in @ x.view(b, -1, x.shape[-1]).transpose(1, 2)  # B, T', h*w*16
        t = hyper_in.shape[1]
        # output pixel (4i + 2 dy1 + dy2, 4j + 2 dx1 + dx2)
        masks = logits.view(b, t, h, w, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, t, 4 * h, 4 * w)
        return masks, self.iou_prediction_head(hs[:, 0, :])[:, selected]


TRAINING_CLASSES: Dict[Type[nn.Module], Type[nn.Module]] = {
    plain_transformer.Attention: Attention,
    plain_transformer.TwoWayAttentionBlock: TwoWayAttentionBlock,
    plain_decoder.MaskUpscaling: MaskUpscaling,
    plain_decoder.MaskDecoder: MaskDecoder,
}


def training_twin(model: nn.Module) -> nn.Module:
    """A twin of `model` for training: same parameters and outputs (to float32 rounding), its
    attention and output upscaling computed faster under autograd. Call its decode/encode/forward as
    the model's; train()/eval() on the twin."""
    return twin(model, TRAINING_CLASSES, keep_unchanged=True)
