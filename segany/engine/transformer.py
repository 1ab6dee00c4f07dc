"""The two-way transformer at inference: a prepared image side shared by every prompt, the
projections folded into the few tokens' side, the compiled image-to-token update, prompts one at a
time on a CPU (see docs/architecture.md). Twins of segany.modeling.transformer's modules: same
parameters, same step names (self_attn, cross_attn_token_to_image, mlp, cross_attn_image_to_token,
final_attn_token_to_image)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import transformer as plain
from .twin import UNBOUND, chosen_at_build, register


def _cast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x in like's dtype. In the fast mode the tokens' side runs in float32 and the image side in
    bfloat16: their products run in the image side's dtype, and what they give the tokens comes back
    to float32 (see segany.engine.precision)."""
    return x.to(like.dtype)  # (x itself where the dtypes agree)


def _image_norm(norm: nn.LayerNorm, x: torch.Tensor, cpu: bool) -> torch.Tensor:
    """norm(x) for the image side. In the fast mode that side is bfloat16 and the norm's weights
    float32: PyTorch's CPU kernel takes the two as they are (statistics and affine in float32); its
    CUDA kernel wants one dtype, so elsewhere the weights are cast to the side's (no-ops where the
    dtypes agree)."""
    if cpu or norm.weight is None:
        return norm(x)
    bias = None if norm.bias is None else norm.bias.to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), bias, norm.eps)


@dataclass
class ProjectedImage:
    """The first block's projections of a shared image side, per head: the token-to-image keys (H, d, N)
    and values (H, N, d), and the image-to-token queries (H, d, N)."""

    keys_t: torch.Tensor
    values: torch.Tensor
    queries_t: torch.Tensor
    # queries_t pixel by pixel (N, H*d), for the compiled image update (segany.engine.native).
    queries_pixels: Optional[torch.Tensor] = None


@dataclass
class ProjectedPE:
    """A block's projections of the positional encoding, per head (H, d, N), with the projection's bias
    (which the image's part, folded into the tokens, then leaves out): for the token-to-image keys and
    (except in the final attention) the image-to-token queries."""

    keys_t: torch.Tensor
    queries_t: Optional[torch.Tensor] = None
    queries_pixels: Optional[torch.Tensor] = None  # queries_t pixel by pixel (N, H*d), as in ProjectedImage


@dataclass
class ImageSide:
    """The image side of the two-way transformer as sequences, channels-last: image (B or 1, h*w, C) and
    its positional encoding pe (1, h*w, C). For an image side shared by every prompt (batch 1) also the
    first block's keys image + pe, computed once. Read-only: any number of decodes may share it."""

    image: torch.Tensor
    pe: torch.Tensor
    first_keys_with_pe: Optional[torch.Tensor]
    size: Tuple[int, int]  # (h, w) of the grid
    # With prepare(project=True): the first block's projections of the shared side, and every later
    # block's (and the final attention's, last) projections of the PE.
    first_block: Optional[ProjectedImage] = None
    pe_projections: Optional[List[ProjectedPE]] = None

    @property
    def shared(self) -> bool:
        return self.first_keys_with_pe is not None


class Attention(plain.Attention):
    """Multi-head attention whose internal width can be downsampled (256 -> 128 for cross-attention)."""

    paths = UNBOUND

    def _scaled_heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """proj(x) per head (B, H, N, d), times the attention's 1/sqrt(d): the scale applied to the few
        tokens' side of a product with the image instead of to its (H, N, h*w) logits (a power of two
        for SAM's heads of 16: the same values)."""
        heads = self._separate_heads(proj(x))
        return heads * (heads.shape[-1] ** -0.5)

    def _fold_into(self, heads: torch.Tensor, proj: nn.Linear) -> Tuple[torch.Tensor, torch.Tensor]:
        """proj folded into the other side's heads (..., H, N, d): rows (..., H*N, C) and biases
        (..., H*N, 1) such that rows . x + biases = heads . proj(x) per head, for any x (..., C)."""
        *lead, n_heads, n, head_dim = heads.shape
        biases = (heads * proj.bias.view(n_heads, 1, head_dim)).sum(-1).reshape(*lead, n_heads * n, 1)
        return self._fold_weight_into(heads, proj), biases

    def _fold_weight_into(self, heads: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """The rows of _fold_into alone: rows . x = heads . (x W^T) per head."""
        *lead, n_heads, n, head_dim = heads.shape
        rows = self.paths.matmul_weight(heads, proj.weight, lambda w: w.view(n_heads, head_dim, -1))
        return rows.reshape(*lead, n_heads * n, -1)

    def _values_out(self, mixed: torch.Tensor) -> torch.Tensor:
        """out_proj of the attention's values from mixed = P x (B, H, Nq, C) of unprojected values x:
        (P x) W_v^T + b_v per head (the rows of P sum to 1), heads recombined: (B, Nq, C)."""
        heads, head_dim = self.num_heads, self.internal_dim // self.num_heads
        mixed = _cast(mixed, self.v_proj.weight)
        out = self.paths.matmul_weight(mixed, self.v_proj.weight, lambda w: w.view(heads, head_dim, -1).transpose(1, 2))
        out = out + self.v_proj.bias.view(heads, 1, head_dim)
        return self.out_proj(self._recombine_heads(out))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """q: (B, Nq, C); k, v: (B, Nk, C). Either side may have batch 1 where every prompt shares the
        image (the first block without a mask prompt): its projections are then computed once.
        With `residual` (B, Nq, C) the result is residual + attention (fused where that saves a pass)."""
        if self.num_heads * k.shape[1] < self.internal_dim and q.shape[1] >= 8 * k.shape[1]:
            return self._few_keys(q, k, v, residual)
        out = self._attend(q, k, v)
        return out if residual is None else residual + out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch_q, batch_k = q.shape[0], k.shape[0]
        heads_q = self.num_heads * q.shape[1]
        if heads_q < self.internal_dim and k.shape[1] >= 8 * q.shape[1]:
            return self._few_queries(q, k, v)
        if batch_k == 1 and batch_q > 1:
            # Shared keys: the prompts' queries are independent rows of one attention.
            n_q = q.shape[1]
            return self.forward(q.reshape(1, batch_q * n_q, q.shape[2]), k, v).reshape(batch_q, n_q, -1)
        q = self._separate_heads(self.q_proj(q))
        k = _cast(self._separate_heads(self.k_proj(k)), q)
        v = _cast(self._separate_heads(self.v_proj(v)), q)
        if batch_q == 1 and batch_k > 1:
            q = q.expand(batch_k, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]))
        return self.out_proj(self._recombine_heads(out))


    # Tokens <-> image attention has a handful of tokens on one side and 4096 image positions on the
    # other. Projecting all 4096 positions (C -> C/2, per prompt) costs more than folding the projection
    # into the tokens' side: (q W_k^T) . x instead of q . (x W_k^T), and P (x W_v^T) = (P x) W_v^T.
    # The same products in another order: equal up to float32 rounding.

    def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries (tokens) on many keys (image): k, v are never projected."""
        heads, n_q, dim = self.num_heads, q.shape[1], self.embedding_dim
        batch = max(q.shape[0], k.shape[0])
        q_heads = self._scaled_heads(q, self.q_proj)  # B, H, Nq, d
        q_k, q_bias = self._fold_into(q_heads, self.k_proj)  # B, H*Nq, C and B, H*Nq, 1
        q_k = _cast(q_k, k)
        if k.shape[0] == 1:  # one image for every prompt: one product for all of them
            logits = self.paths.linear(q_k.reshape(-1, dim), k[0]).view(q.shape[0], heads * n_q, -1)
        else:
            logits = q_k @ k.transpose(1, 2)  # B, H*Nq, Nk
        probs = (logits + _cast(q_bias, logits)).softmax(-1)
        if v.shape[0] == 1:
            mixed = self.paths.linear(probs.reshape(-1, probs.shape[-1]), v[0].t()).view(batch, heads, n_q, dim)
        else:
            mixed = (probs @ v).view(batch, heads, n_q, dim)  # B, H, Nq, C
        return self._values_out(mixed)

    def _few_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Many queries (image) on few keys (tokens): q is never projected, nor the output per position."""
        heads, n_k, dim = self.num_heads, k.shape[1], self.embedding_dim
        k_heads = self._scaled_heads(k, self.k_proj)  # B, H, Nk, d
        v_heads = self._separate_heads(self.v_proj(v))
        batch = k_heads.shape[0]
        k_q, q_bias = self._fold_into(k_heads, self.q_proj)  # B, H*Nk, C and B, H*Nk, 1
        k_q, q_bias = _cast(k_q, q), _cast(q_bias, q)
        if q.shape[0] == 1 and batch > 1:  # one image for every prompt: one product, q not repeated
            logits = (q[0] @ k_q.reshape(batch * heads * n_k, dim).t()).view(-1, batch, heads * n_k)
            logits = logits.permute(1, 2, 0)  # B, H*Nk, Nq
        elif batch == 1:  # 2-D products: bfloat16 batched products of transposed views copy them first
            logits = self.paths.linear(k_q[0], q[0])[None]  # 1, H*Nk, Nq
        else:
            logits = k_q @ q.transpose(1, 2)  # B, H*Nk, Nq
        return self._mix_into_image(logits.add_(q_bias), v_heads, residual)

    def _values_out_per_head(self, v_heads: torch.Tensor) -> torch.Tensor:
        """The tokens' values (B, H, Nk, d), each head's through its slice of out_proj (H, d, C):
        (B, H, Nk, C), without the bias."""
        dim, heads = self.embedding_dim, v_heads.shape[1]
        return self.paths.matmul_weight(v_heads, self.out_proj.weight, lambda w: w.view(dim, heads, -1).permute(1, 2, 0))

    def _mix_into_image(
        self, logits: torch.Tensor, v_heads: torch.Tensor, residual: Optional[torch.Tensor], in_place: bool = False
    ) -> torch.Tensor:
        """The image side's attention output from scaled logits (B, H*Nk, Nq) (heads x token keys on the
        rows) and the tokens' values (B, H, Nk, d): out_proj(attention) (+ residual), (B, Nq, C).
        in_place: accumulate into `residual` itself (a tensor nothing else reads any more)."""
        batch, heads, n_k, _ = v_heads.shape
        dim = self.embedding_dim
        # The softmax over each head's few keys reduces across rows with the image positions vectorised
        # (over a last dimension of size Nk it ran about 20x slower on a CPU). Same arithmetic.
        probs = logits.view(batch, heads, n_k, -1).softmax(2).view(batch, heads * n_k, -1)
        v_out = self._values_out_per_head(v_heads).reshape(batch, heads * n_k, dim)
        if residual is None:
            start = _cast(self.out_proj.bias, probs).expand(batch, 1, dim)
        else:
            # Each head's probabilities sum to 1, so the output bias can ride on the values (bias / heads
            # per head) and the residual be the product's accumulator: one pass over the image side.
            start = residual
            v_out = v_out + self.out_proj.bias / heads
        v_out = _cast(v_out, probs)
        if in_place and residual is not None and batch == 1:
            residual[0].addmm_(probs[0].t(), v_out[0])
            return residual
        if batch == 1:
            return torch.addmm(start[0], probs[0].t(), v_out[0])[None]
        return torch.baddbmm(start, probs.transpose(1, 2), v_out)

    # An image side shared by every prompt can be projected once (ProjectedImage): then the attention
    # between a prompt's few tokens and the image is a product with the tokens' side only, about 16x
    # fewer operations than folding the projections into the tokens (as above). Same arithmetic as the
    # plain attention of the released code.

    def project_image(self, x: torch.Tensor, proj: nn.Linear, transposed: bool) -> torch.Tensor:
        """proj(x) for one image side x (1, N, C), per head: (H, N, d), or (H, d, N) when transposed."""
        heads = self._separate_heads(proj(x))[0]  # H, N, d
        return heads.transpose(1, 2).contiguous() if transposed else heads.contiguous()

    def attend_to_projected(self, q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One prompt's tokens q (1, Nq, C) attending to a projected image: keys_t (H, d, N) from
        project_image(k, k_proj, True), values (H, N, d) from project_image(v, v_proj, False)."""
        q_heads = self._scaled_heads(q, self.q_proj)[0]  # H, Nq, d
        probs = (_cast(q_heads, keys_t) @ keys_t).softmax(-1)  # H, Nq, N
        return self.out_proj(self._recombine_heads(_cast(probs @ values, q_heads)[None]))

    def attend_from_projected(
        self, queries_t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """A projected image, queries_t (H, d, N) from project_image(q, q_proj, True), attending to one
        prompt's tokens k, v (1, Nk, C): (1, N, C), plus residual."""
        k_heads = self._scaled_heads(k, self.k_proj)  # 1, H, Nk, d
        v_heads = self._separate_heads(self.v_proj(v))
        logits = (_cast(k_heads[0], queries_t) @ queries_t).view(1, -1, queries_t.shape[-1])  # 1, H*Nk, N
        return self._mix_into_image(logits, v_heads, residual)

    # Later blocks attend between the tokens and a prompt's own image side plus the shared PE. The PE's
    # projections are computed once (project_pe); then image + PE is never formed: the logits are the
    # image's part folded into the tokens (as in _few_queries/_few_keys) plus the PE's part, a small
    # product with the tokens' heads. Two fewer passes over the (N, C) image side per attention; the
    # projection's bias rides on the PE's part (q . (W (x + pe) + b) = (q W) . x + q . (W pe + b)), which
    # saves a pass over the logits.

    def project_pe(self, pe: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """proj(pe) for pe (1, N, C), per head: (H, d, N)."""
        return self._separate_heads(self.paths.linear(pe, proj.weight, proj.bias))[0].transpose(1, 2).contiguous()

    def attend_to_image_and_pe(self, q: torch.Tensor, image: torch.Tensor, pe_keys_t: torch.Tensor) -> torch.Tensor:
        """One prompt's tokens q (1, Nq, C) attending to keys image + PE and values image (1, N, C), with
        pe_keys_t = project_pe(pe, k_proj). Equals forward(q, image + pe, image)."""
        heads, n_q, dim = self.num_heads, q.shape[1], self.embedding_dim
        q_heads = self._scaled_heads(q, self.q_proj)[0]  # H, Nq, d
        q_k = self._fold_weight_into(q_heads, self.k_proj)  # H*Nq, C
        logits = self.paths.linear(_cast(q_k, image), image[0]).view(heads, n_q, -1)  # H, Nq, N
        logits = logits.baddbmm_(_cast(q_heads, logits), pe_keys_t)  # + the PE's part and the bias's
        probs = logits.softmax(-1)
        mixed = self.paths.linear(probs.view(heads * n_q, -1), image[0].t()).view(1, heads, n_q, dim)  # 1, H, Nq, C
        return self._values_out(mixed)

    def attend_from_image_and_pe(
        self, image: torch.Tensor, pe_queries_t: torch.Tensor, k: torch.Tensor, v: torch.Tensor, in_place: bool
    ) -> torch.Tensor:
        """Queries image + PE (1, N, C), with pe_queries_t = project_pe(pe, q_proj), attending to one
        prompt's tokens k, v (1, Nk, C): image + attention, accumulated into `image` when in_place.
        Equals forward(image + pe, k, v, residual=image)."""
        heads, n_k = self.num_heads, k.shape[1]
        k_heads = self._scaled_heads(k, self.k_proj)  # 1, H, Nk, d
        v_heads = self._separate_heads(self.v_proj(v))
        k_q = self._fold_weight_into(k_heads[0], self.q_proj)  # H*Nk, C
        logits = self.paths.linear(_cast(k_q, image), image[0]).view(heads, n_k, -1)  # H, Nk, N
        logits = logits.baddbmm_(_cast(k_heads[0], logits), pe_queries_t)  # + the PE's part and the bias's
        return self._mix_into_image(logits.view(1, heads * n_k, -1), v_heads, image, in_place=in_place)

    # The same update through the compiled kernel (segany.engine.native): the logits of every pixel
    # against the few tokens, their softmax, the values, the residual and the layer norm in one pass
    # over the image side instead of six. Its logits, softmax and residual stay in float32 (PyTorch's
    # bfloat16 path rounds each), its probabilities are rounded to bfloat16 as there.

    MAX_NATIVE_TOKENS = 32

    def native_image_update(
        self,
        image: torch.Tensor,
        pixels: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        norm: nn.LayerNorm,
        fold_image: bool,
        out: torch.Tensor,
    ) -> Optional[torch.Tensor]:
        """norm(image + attention of the image to one prompt's tokens k, v (1, Nk, C)) into out (1, N, C)
        (which may be image itself), where the image's query projection is given per pixel by
        `pixels` (N, H*d): with fold_image the PE's (with the bias; the image's own part is folded into
        the tokens, as in attend_from_image_and_pe), else the whole projection (the first block's
        kept queries, as in attend_from_projected). None where the kernel does not apply."""
        heads, n_k, dim = self.num_heads, k.shape[1], self.embedding_dim
        if n_k > self.MAX_NATIVE_TOKENS or k.shape[0] != 1:
            return None
        gain, beta = norm.weight, norm.bias
        query_weight = self.q_proj.weight
        k_heads = self._scaled_heads(k, self.k_proj)[0].float().contiguous()  # H, Nk, d
        v_heads = self._separate_heads(self.v_proj(v))
        # (+ the output bias / heads on every head's values, as in _mix_into_image)
        values = self._values_out_per_head(v_heads)[0].float() + self.out_proj.bias.float() / heads
        values = values.contiguous()  # H, Nk, C
        # (contiguous operands held in locals for the call's duration)
        query_weight = query_weight.detach().contiguous() if fold_image else None
        gain, beta = gain.detach().contiguous(), beta.detach().contiguous()
        self.paths.native.segany_image_to_tokens_bf16(
            image.data_ptr(), image.shape[1], dim, pixels.data_ptr(), pixels.shape[1], k_heads.data_ptr(),
            None if query_weight is None else query_weight.data_ptr(), values.data_ptr(), n_k,
            gain.data_ptr(), beta.data_ptr(), float(norm.eps), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out


def pixel_major(heads_t: torch.Tensor) -> torch.Tensor:
    """Per-head projections (H, d, N) -> (N, H*d): each pixel's projection as one row."""
    h, d, n = heads_t.shape
    return heads_t.permute(2, 0, 1).reshape(n, h * d).contiguous()


def native_image_update_usable(transformer: "TwoWayTransformer", paths) -> bool:
    """Whether the compiled image update (csrc/decoder_bf16.c) runs a transformer's image-to-token
    attentions (chosen when the engine is built): a bfloat16 image side (the fast mode's bulk: its MLPs
    are converted with it, MaskDecoder.bulk_modules) on a CPU with the kernels loaded, SAM's 8 heads,
    float32 norms after them and float32 query projections (the tokens' side)."""
    blocks = list(transformer.layers)
    attention = blocks[0].cross_attn_image_to_token
    return (
        paths.native is not None
        and blocks[0].mlp.lin1.weight.dtype == torch.bfloat16
        and attention.num_heads == 8
        and attention.embedding_dim % 64 == 0
        and attention.embedding_dim <= 1024
        and attention.internal_dim % 2 == 0
        and all(
            b.norm4.weight is not None
            and b.norm4.bias is not None
            and b.norm4.weight.dtype == b.norm4.bias.dtype == torch.float32
            and b.cross_attn_image_to_token.q_proj.weight.dtype == torch.float32
            for b in blocks
        )
    )


class TwoWayAttentionBlock(plain.TwoWayAttentionBlock):
    paths = UNBOUND

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        keys_with_pe: Optional[torch.Tensor] = None,
        projected: Optional[ProjectedImage] = None,
        projected_pe: Optional[ProjectedPE] = None,
        keys_owned: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """keys_with_pe: keys + key_pe when the caller already has it (an image side shared by prompts);
        projected: this block's projections of that shared side (for one prompt), see project();
        projected_pe: this block's projections of key_pe (for one prompt's own keys), see project_pe();
        keys_owned: keys is the caller's to overwrite (inference), the image update accumulates into it."""
        queries = self.token_self_attention(queries, query_pe)

        # Tokens attend to the image.
        q = queries + query_pe
        if projected is not None:
            attn = self.cross_attn_token_to_image.attend_to_projected(q, projected.keys_t, projected.values)
        elif projected_pe is not None:
            attn = self.cross_attn_token_to_image.attend_to_image_and_pe(q, keys, projected_pe.keys_t)
        else:
            k = keys + key_pe if keys_with_pe is None else keys_with_pe
            attn = self.cross_attn_token_to_image(q=q, k=k, v=keys)
        queries = self.norm2(queries + attn)

        queries = self.norm3(queries + self.mlp(queries))

        # The image attends to the tokens (keys are unchanged since k was formed above).
        q = queries + query_pe
        updated = self._native_image_update(keys, projected, projected_pe, q, queries, keys_owned)
        if updated is not None:
            return queries, updated
        if projected is not None:
            attn = self.cross_attn_image_to_token.attend_from_projected(projected.queries_t, q, queries, residual=keys)
        elif projected_pe is not None:
            attn = self.cross_attn_image_to_token.attend_from_image_and_pe(
                keys, projected_pe.queries_t, q, queries, in_place=keys_owned
            )
        else:
            attn = self.cross_attn_image_to_token(q=k, k=q, v=queries, residual=keys)
        return queries, _image_norm(self.norm4, attn, self.paths.cpu)

    def _native_image_update(
        self,
        keys: torch.Tensor,
        projected: Optional[ProjectedImage],
        projected_pe: Optional[ProjectedPE],
        q: torch.Tensor,
        queries: torch.Tensor,
        keys_owned: bool,
    ) -> Optional[torch.Tensor]:
        """The image-to-token attention, residual and norm4 through the compiled kernel, where the
        image side has kept pixel-major projections (see TwoWayTransformer.prepare); else None."""
        kept = projected if projected is not None else projected_pe
        if kept is None or kept.queries_pixels is None or keys.shape[0] != 1:
            return None
        if not keys.is_contiguous():  # (the kept projections exist where the kernel was chosen: bfloat16)
            return None
        out = keys if keys_owned and projected is None else torch.empty_like(keys)
        return self.cross_attn_image_to_token.native_image_update(
            keys, kept.queries_pixels, q, queries, self.norm4, fold_image=projected is None, out=out
        )

    def project(self, image: torch.Tensor, image_with_pe: torch.Tensor) -> ProjectedImage:
        """This block's projections of a shared image side (1, N, C) (and + PE), for forward(projected=)."""
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        return ProjectedImage(
            keys_t=t2i.project_image(image_with_pe, t2i.k_proj, transposed=True),
            values=t2i.project_image(image, t2i.v_proj, transposed=False),
            queries_t=i2t.project_image(image_with_pe, i2t.q_proj, transposed=True),
        )

    def project_pe(self, pe: torch.Tensor) -> ProjectedPE:
        """This block's projections of the PE (1, N, C), for forward(projected_pe=)."""
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        return ProjectedPE(keys_t=t2i.project_pe(pe, t2i.k_proj), queries_t=i2t.project_pe(pe, i2t.q_proj))


# Prompts run through the transformer together outside autograd (see TwoWayTransformer.forward).
INFERENCE_MICRO_BATCH = 1


class TwoWayTransformer(plain.TwoWayTransformer):
    paths = UNBOUND
    # The compiled image-to-token update (see native_image_update_usable).
    native_image_updates = chosen_at_build(lambda m, paths: native_image_update_usable(m, paths))

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        outputs: Optional[Union[int, Sequence[int]]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """image_embedding, image_pe: (B or 1, C, h, w); point_embedding: (B, N, C).

        Returns the processed tokens (B, N, C) and image features (B, h*w, C). An image side of batch 1 is
        shared by every prompt: its projections in the first block are computed once, not per prompt.
        outputs: only these tokens (the first `outputs` of them, or these indices in this order) go
        through the final attention and are returned. The decoder reads only some of its output tokens
        (the IoU token and the masks it returns); the prompt tokens' last update is never used.
        """
        return self.run(self.prepare(image_embedding, image_pe), point_embedding, outputs)

    def prepare(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, project: bool = False) -> ImageSide:
        """(B or 1, C, h, w) image side and PE -> the sequences run() takes. An image side of batch 1 can be
        prepared once and run with any number of prompts; with `project` (inference) the first block's
        projections of it are computed too: three (h*w, C) products once, which save about twice that
        per prompt (worth it from a few prompts on, or when the side is kept for later prompts)."""
        size = (image_embedding.shape[2], image_embedding.shape[3])
        image = image_embedding.flatten(2).transpose(1, 2)  # B or 1, h*w, C
        if image_pe.shape[0] > 1 and image_pe.stride(0) == 0:
            image_pe = image_pe[:1]  # an expanded PE: keep one copy and broadcast
        image_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        if image.shape[0] != 1:
            return ImageSide(image, image_pe, None, size)
        image = image.contiguous()  # channels-last once
        side = ImageSide(image, image_pe, image + image_pe, size)
        if project:
            side.first_block = self.layers[0].project(side.image, side.first_keys_with_pe)
            final = self.final_attn_token_to_image
            side.pe_projections = [layer.project_pe(image_pe) for layer in self.layers[1:]]
            side.pe_projections.append(ProjectedPE(keys_t=final.project_pe(image_pe, final.k_proj)))
            if self.native_image_updates:
                # The compiled image update reads each pixel's query projection as one row.
                side.first_block.queries_pixels = pixel_major(side.first_block.queries_t)
                for kept in side.pe_projections[:-1]:
                    kept.queries_pixels = pixel_major(kept.queries_t)
        return side

    def run(
        self,
        side: ImageSide,
        point_embedding: torch.Tensor,
        outputs: Optional[Union[int, Sequence[int]]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts (B, N, C) against a prepared image side -> tokens (those `outputs` selects, see
        forward) and image features (B, h*w, C)."""
        batch = point_embedding.shape[0]
        if outputs is not None and not isinstance(outputs, (int, torch.Tensor)):
            outputs = list(outputs)
            # The first tokens in order are a view; any other choice is gathered (index tensor made once).
            prefix = outputs == list(range(len(outputs)))
            outputs = len(outputs) if prefix else torch.as_tensor(outputs, device=point_embedding.device)
        if side.shared and batch > INFERENCE_MICRO_BATCH and self.paths.cpu:
            # One prompt at a time keeps each prompt's (h*w, C) image side in cache (memory-bound on a
            # CPU): faster per prompt than a whole batch, same results. (A GPU takes them at once.)
            step = INFERENCE_MICRO_BATCH
            parts = [
                self.run(side, point_embedding[start : start + step], outputs)
                for start in range(0, batch, step)
            ]
            return torch.cat([q for q, _ in parts]), torch.cat([k for _, k in parts])
        queries, keys = self.run_blocks(side, point_embedding)
        if isinstance(outputs, int):
            queries, point_embedding = queries[:, :outputs], point_embedding[:, :outputs]
        elif outputs is not None:  # each token's row of the final attention is independent of the others
            queries, point_embedding = queries.index_select(1, outputs), point_embedding.index_select(1, outputs)
        queries = self.final_attention(queries, point_embedding, keys, side=side)
        if keys.shape[0] != queries.shape[0]:
            keys = keys.expand(queries.shape[0], -1, -1)
        return queries, keys

    def run_blocks(self, side: ImageSide, point_embedding: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two-way blocks: tokens (B, N, C) and image side (B, h*w, C) before the final attention."""
        queries, keys = point_embedding, side.image
        one_prompt = point_embedding.shape[0] == 1
        projected = side.first_block if one_prompt else None
        pe_projections = side.pe_projections if one_prompt else None
        for i, layer in enumerate(self.layers):
            queries, keys = layer(
                queries,
                keys,
                query_pe=point_embedding,
                key_pe=side.pe,
                keys_with_pe=side.first_keys_with_pe if i == 0 else None,
                projected=projected if i == 0 else None,
                projected_pe=pe_projections[i - 1] if pe_projections is not None and i > 0 else None,
                keys_owned=i > 0,  # the previous block's fresh output
            )
        return queries, keys

    def final_attention(
        self,
        queries: torch.Tensor,
        query_pe: torch.Tensor,
        keys: torch.Tensor,
        keys_with_pe: Optional[torch.Tensor] = None,
        side: Optional[ImageSide] = None,
    ) -> torch.Tensor:
        """The last token-to-image attention and norm, keys (B, h*w, C) + PE: keys_with_pe if given, else
        keys + side.pe (or, for one prompt of a side with projected PE, without forming it). Each token's
        row is independent of the others, so any subset of tokens (with its PE rows) can go through it."""
        q = queries + query_pe
        attention = self.final_attn_token_to_image
        if keys_with_pe is None and side is not None and side.pe_projections and keys.shape[0] == 1:
            return self.norm_final_attn(queries + attention.attend_to_image_and_pe(q, keys, side.pe_projections[-1].keys_t))
        if keys_with_pe is None:
            keys_with_pe = keys + side.pe
        return self.norm_final_attn(queries + attention(q=q, k=keys_with_pe, v=keys))


register(plain.Attention, Attention)
register(plain.TwoWayAttentionBlock, TwoWayAttentionBlock)
register(plain.TwoWayTransformer, TwoWayTransformer)
