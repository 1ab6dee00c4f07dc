"""The annotator page's decoder graph: SAM's prompt encoder + mask decoder, folded for a few tokens.

The page (ONNX Runtime Web, WebAssembly on the annotator's CPU) decodes one prompt against one image
embedding: a handful of tokens (the IoU and mask output tokens, the points) meet h*w image positions.
The plain modules project the image side in every cross-attention ((h*w) x C x C/2 products, four
per two-way block and one more for the final attention); here those projections are folded into the
few tokens' side instead, which gives the same attention:

- tokens to image: the logits q_h . (W_k,h x + b_k,h) = (q_h W_k,h) . x + q_h . b_k,h, and the last
  term is the same for every image position, so softmax drops it; the values
  P (x W_v,h^T + b_v,h) = (P x) W_v,h^T + b_v,h since each row of P sums to 1;
- image to tokens: the logits (W_q,h x + b_q,h) . k_h = x . (W_q,h^T k_h) + b_q,h . k_h, and each head's
  output goes through out_proj's columns for that head before the positions' product:
  sum_h P_h (v_h W_o,h^T) + b_o.

So each attention against the image costs two products of (heads * tokens) x C with the image
instead of four of C/2 x C. Everything image-sized is kept channels-last ((h*w, C) rows): the mask
input's 2x2 stride-2 convolutions and the output upscaling's 2x2 stride-2 transposed convolutions are
matrix products over each pixel's block (blocks do not overlap), their channel norms layer norms over
the last axis, and only the final mask logits are put back in image order.

With PageDecoderGraph(precomputed=True) the first two-way block's image-side projections are inputs,
made once per image by PageImageGraph: that block's image side is the embedding (+ pe) plus the mask
input's dense embedding, which is a product of rank C/16 + 1 (its last 1x1 convolution on C/16 channels,
and its bias or the no-mask embedding); so its projections are the embedding's, made once, plus the
rank-17 rows' projections, made per prompt, for every prompt with or without a mask input. The later
blocks' image sides depend on the prompt and are folded as above.

The products are the plain ones in another order: outputs equal the plain graph's up to float32
rounding (tests/test_page_graph.py). The graph has the interface of
segany.io.onnx_export.PromptDecoderLowResGraph and is exported by segany.io.onnx_export
(export_decoder(..., folded=True)); the model's modules are read, never changed.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import transformer as plain_transformer
from ..modeling.common import LayerNorm2d


def embed_points(prompt_encoder: nn.Module, image_size: int, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) points in the model's input frame and (B, N) labels (1 / 0 points, 2 / 3 box corners,
    -1 padding) -> sparse prompt embeddings (B, N, C), as in the released ONNX export."""
    coords = (coords + 0.5) / image_size
    embedding = prompt_encoder.pe_layer._pe_encoding(coords)  # B, N, C
    labels = labels[..., None]
    embedding = torch.where(labels == -1, prompt_encoder.not_a_point_embed.weight, embedding)
    for label, table in enumerate(prompt_encoder.point_embeddings):
        embedding = embedding + (labels == label).to(embedding.dtype) * table.weight
    return embedding


def page_graph_unsupported(model: nn.Module) -> str | None:
    """Why `model`'s decoder has no folded page graph, or None."""
    decoder = getattr(model, "mask_decoder", None)
    if decoder is None or not hasattr(model, "prompt_encoder"):
        return f"{type(model).__name__} has no SAM prompt decoder"
    if hasattr(decoder, "hf_token"):  # HQ-SAM (MobileSAM's encoder has forward_with_interm too)
        return "HQ-SAM's decoder needs early encoder features"
    transformer = decoder.transformer
    if type(transformer) is not plain_transformer.TwoWayTransformer:
        return f"the decoder's transformer is a {type(transformer).__name__}, not SAM's two-way transformer"
    for layer in transformer.layers:
        if type(layer) is not plain_transformer.TwoWayAttentionBlock:
            return f"a two-way layer is a {type(layer).__name__}"
    for attn in transformer.modules():
        if isinstance(attn, plain_transformer.Attention) and type(attn) is not plain_transformer.Attention:
            return f"an attention is a {type(attn).__name__}"
    norms = [decoder.output_upscaling[1], model.prompt_encoder.mask_downscaling[1], model.prompt_encoder.mask_downscaling[4]]
    if not all(isinstance(norm, LayerNorm2d) for norm in norms):
        return "the decoder's channel norms are not LayerNorm2d"
    return None


# Reshapes name every size but the number of tokens, which is the graph's one dynamic size: a
# reshape to fixed sizes needs no shape computations in the graph.


def _heads(attn: nn.Module, x: torch.Tensor, proj: nn.Linear, scale: float = 1.0) -> torch.Tensor:
    """proj(x) per head: (T, C) -> (H, T, d), times `scale`."""
    return (proj(x) * scale).view(-1, attn.num_heads, attn.internal_dim // attn.num_heads).transpose(0, 1)


def _through(attn: nn.Module, heads: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
    """Each head's rows (H, T, d) through that head's rows of proj's weight (d, C): (H*T, C)."""
    n_heads, dim = attn.num_heads, attn.embedding_dim
    return (heads @ proj.weight.view(n_heads, -1, dim)).reshape(-1, dim)


def tokens_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """attn(q, k, v) for a few queries q (T, C) on the image k, v (h*w, C) -> (T, C)."""
    n_heads, dim = attn.num_heads, attn.embedding_dim
    head_dim = attn.internal_dim // n_heads
    rows = _through(attn, _heads(attn, q, attn.q_proj, head_dim**-0.5), attn.k_proj)  # H*T, C
    probs = (rows @ k.transpose(0, 1)).softmax(-1)  # H*T, h*w (k_proj's bias: the same for every position)
    mixed = (probs @ v).view(n_heads, -1, dim)  # H, T, C: P x
    w_v = attn.v_proj.weight.view(n_heads, head_dim, dim).transpose(1, 2)  # H, C, d
    out = mixed @ w_v + attn.v_proj.bias.view(n_heads, 1, head_dim)  # H, T, d
    return attn.out_proj(out.transpose(0, 1).reshape(-1, attn.internal_dim))


def _values_through_out(attn: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """The few tokens' values v (T, C) through v_proj and each head's columns of out_proj: (H*T, C), with
    out_proj's bias riding on them, a 1/H share per head (each head's probabilities sum to 1)."""
    n_heads, dim = attn.num_heads, attn.embedding_dim
    head_dim = attn.internal_dim // n_heads
    w_o = attn.out_proj.weight.view(dim, n_heads, head_dim).permute(1, 2, 0)  # H, d, C
    values_out = _heads(attn, v, attn.v_proj) @ w_o  # H, T, C
    return (values_out + attn.out_proj.bias / n_heads).reshape(-1, dim)


def image_to_tokens(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + attn(q, k, v) for the image's queries q (h*w, C) on a few tokens k, v (T, C) -> (h*w, C),
    the residual (h*w, C) added inside the last product (one Gemm)."""
    n_heads, positions = attn.num_heads, residual.shape[0]
    head_dim = attn.internal_dim // n_heads
    k_heads = _heads(attn, k, attn.k_proj, head_dim**-0.5)  # H, T, d
    rows = _through(attn, k_heads, attn.q_proj)  # H*T, C
    biases = (k_heads * attn.q_proj.bias.view(n_heads, 1, head_dim)).sum(-1).reshape(-1)  # H*T
    logits = q @ rows.transpose(0, 1) + biases  # h*w, H*T
    # each head's softmax over its tokens
    probs = logits.view(positions, n_heads, -1).softmax(-1).view(positions, -1)
    return torch.addmm(residual, probs, _values_through_out(attn, v))


# The first two-way block with its image-side projections made once per image (PageImageGraph): its image
# side is x + pe + dense (keys) and x + dense (values), where the dense embedding is rows @ weight of rank
# C/16 + 1 (PageDecoderGraph.dense_rows); so each projection is the image's, made once, plus the rank-r
# rows' projection, made per prompt: (x + dense) W^T = x W^T + rows (weight W^T).


def tokens_to_image_projected(attn: nn.Module, q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor,
                              rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """attn(q, k, v) for a few queries q (T, C) on k = x + pe + rows @ weight, v = x + rows @ weight, given
    keys_t (H, d, h*w) = k_proj's weight times (x + pe) and values (H, h*w, d) = v_proj's weight times x
    (both without bias: k_proj's is the same for every position, which softmax drops) -> (T, C)."""
    n_heads, rank, positions = attn.num_heads, rows.shape[1], rows.shape[0]
    head_dim = attn.internal_dim // n_heads
    q_heads = _heads(attn, q, attn.q_proj, head_dim**-0.5)  # H, T, d
    w_k = (weight @ attn.k_proj.weight.transpose(0, 1)).view(rank, n_heads, head_dim).permute(1, 2, 0)  # H, d, r
    dense_logits = ((q_heads @ w_k).reshape(-1, rank) @ rows.transpose(0, 1)).view(n_heads, -1, positions)  # H, T, h*w
    probs = (q_heads @ keys_t + dense_logits).softmax(-1)  # H, T, h*w
    w_v = (weight @ attn.v_proj.weight.transpose(0, 1)).view(rank, n_heads, head_dim).transpose(0, 1)  # H, r, d
    mixed_rows = (probs.reshape(-1, positions) @ rows).view(n_heads, -1, rank)  # H, T, r: P rows
    out = probs @ values + mixed_rows @ w_v + attn.v_proj.bias.view(n_heads, 1, head_dim)  # H, T, d
    return attn.out_proj(out.transpose(0, 1).reshape(-1, attn.internal_dim))


def image_to_tokens_projected(attn: nn.Module, queries: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor,
                              k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + attn(q, k, v) for the image's queries q = x + pe + rows @ weight on a few tokens k, v (T, C),
    given queries (H, h*w, d) = q_proj's weight times (x + pe) (without bias) -> (h*w, C)."""
    n_heads, rank, positions = attn.num_heads, rows.shape[1], rows.shape[0]
    head_dim = attn.internal_dim // n_heads
    k_heads = _heads(attn, k, attn.k_proj, head_dim**-0.5)  # H, T, d
    image_logits = (queries @ k_heads.transpose(1, 2)).permute(1, 0, 2).reshape(positions, -1)  # h*w, H*T
    w_q = (weight @ attn.q_proj.weight.transpose(0, 1)).view(rank, n_heads, head_dim).transpose(0, 1)  # H, r, d
    dense_to_logits = (w_q @ k_heads.transpose(1, 2)).permute(1, 0, 2).reshape(rank, -1)  # r, H*T
    biases = (k_heads * attn.q_proj.bias.view(n_heads, 1, head_dim)).sum(-1).reshape(-1)  # H*T
    logits = torch.addmm(image_logits + biases, rows, dense_to_logits)  # h*w, H*T
    probs = logits.view(positions, n_heads, -1).softmax(-1).view(positions, -1)
    return torch.addmm(residual, probs, _values_through_out(attn, v))


def _blocks_2x2(x: torch.Tensor) -> torch.Tensor:
    """(C, 2h, 2w) -> (4*C, h*w): each 2x2 block's pixels (dy, dx) and channels in a column."""
    c, h2, w2 = x.shape
    return x.view(c, h2 // 2, 2, w2 // 2, 2).permute(2, 4, 0, 1, 3).reshape(4 * c, -1)


def _conv_2x2(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A 2x2 stride-2 convolution, channels-first: (I, 2h, 2w) -> (O, h*w), one product over the blocks."""
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)  # O, (dy, dx, I)
    return torch.addmm(conv.bias[:, None], weight, _blocks_2x2(x))


def _conv_transpose_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2x2 stride-2 transposed convolution per pixel, channels-last: (..., I) -> (..., 4, O), the
    pixel's output block in (dy, dx) order."""
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c_in, 4 * c_out)  # I, (dy, dx, O)
    rows = torch.addmm(conv.bias.repeat(4), x.reshape(-1, c_in), weight)  # 2-D: one Gemm with its bias
    return rows.view(*x.shape[:-1], 4, c_out)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dim: int = -1) -> torch.Tensor:
    """Layer norm over `dim` written out (mean, biased variance): ONNX Runtime Web's LayerNormalization
    kernel costs several times these vectorised reductions and products on the image-sized tensors. The
    inverse deviation is sqrt's reciprocal, not rsqrt: ONNX Runtime turns rsqrt's 1 / sqrt times the
    tensor into a division of the whole tensor."""
    centred = x - x.mean(dim, keepdim=True)
    scale = ((centred * centred).mean(dim, keepdim=True) + eps).sqrt().reciprocal()
    return centred * scale * weight + bias


def _image_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """nn.LayerNorm (over the last axis) of an image-sized tensor."""
    return _layer_norm(x, norm.weight, norm.bias, norm.eps)


def _channel_norm(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    """LayerNorm2d over the last axis of a channels-last tensor (the same mean and biased variance)."""
    return _layer_norm(x, norm.weight, norm.bias, norm.eps)


def _channel_norm_first(x: torch.Tensor, norm: LayerNorm2d) -> torch.Tensor:
    """LayerNorm2d of a channels-first (C, h*w) tensor: the mask input's few channels (4, 16) make short
    rows channels-last, which ONNX Runtime's per-row kernels handle slowly."""
    return _layer_norm(x, norm.weight[:, None], norm.bias[:, None], norm.eps, dim=0)


class PageDecoderGraph(nn.Module):
    """(image_embeddings (1, C, h, w), point_coords (1, N, 2), point_labels (1, N), mask_input
    (1, 1, 4h, 4w), has_mask_input (1,)) -> iou_predictions (1, T), low_res_masks (1, T, 4h, 4w): the
    model's prompt encoder and mask decoder (every mask token), with its attentions folded for a few tokens."""

    def __init__(self, model: nn.Module, precomputed: bool = False) -> None:
        super().__init__()
        reason = page_graph_unsupported(model)
        if reason is not None:
            raise ValueError(f"no folded page decoder: {reason}")
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.image_size = int(model.image_size)
        # precomputed: the first block's image-side projections are inputs (PageImageGraph's outputs, made once per image)
        self.precomputed = precomputed
        image_pe = self.prompt_encoder.get_dense_pe().detach()  # 1, C, h, w
        self.register_buffer("image_pe", image_pe[0].flatten(1).transpose(0, 1).contiguous(), persistent=False)

    def dense_rows(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mask input's dense embedding (or the no-mask embedding) as a product rows @ weight, rows
        (h*w, C/16 + 1) and weight (C/16 + 1, C): the dense embedding's last 1x1 convolution, its bias and
        the choice between the two are one product (rank C/16 + 1: cheap to project, see PageImageGraph)."""
        conv1, norm1, act1, conv2, norm2, act2, conv3 = self.prompt_encoder.mask_downscaling
        # channels-first: C/64 and C/16 channels over (2h*2w and h*w) positions
        x = act1(_channel_norm_first(_conv_2x2(mask_input[0], conv1), norm1))  # C/64, 2h*2w
        h2, w2 = mask_input.shape[2] // 2, mask_input.shape[3] // 2
        x = act2(_channel_norm_first(_conv_2x2(x.view(-1, h2, w2), conv2), norm2))  # C/16, h*w
        no_mask = self.prompt_encoder.no_mask_embed.weight  # 1, C
        # has * (x W3^T + b3) + (1 - has) * no_mask = [has * x, 1] [W3^T; has * b3 + (1 - has) * no_mask]
        columns = torch.cat([has_mask_input * x, torch.ones_like(x[:1])], dim=0)  # C/16 + 1, h*w
        bias = has_mask_input * conv3.bias + (1 - has_mask_input) * no_mask[0]  # C
        weight = torch.cat([conv3.weight.flatten(1).transpose(0, 1), bias[None]], dim=0)  # C/16 + 1, C
        return columns.transpose(0, 1), weight  # (the products take the rows transposed as they are)

    def transformer(self, keys: torch.Tensor, tokens: torch.Tensor, first=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """TwoWayTransformer.forward for one prompt: image (h*w, C) and tokens (T, C) -> tokens, image.
        first: (rows, weight, keys_t, values, queries) for the first block's attentions with the image-side
        projections made once per image (PageImageGraph)."""
        transformer, key_pe, query_pe = self.mask_decoder.transformer, self.image_pe, tokens
        queries = tokens
        for index, layer in enumerate(transformer.layers):
            queries = layer.token_self_attention(queries[None], query_pe[None])[0]
            if index == 0 and first is not None:
                rows, weight, keys_t, values, image_queries = first
                attended = tokens_to_image_projected(layer.cross_attn_token_to_image, queries + query_pe, keys_t, values, rows, weight)
            else:
                k = keys + key_pe  # the image side's keys, the same for both cross-attentions of the block
                attended = tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys)
            queries = layer.norm2(queries + attended)
            queries = layer.norm3(queries + layer.mlp(queries))
            if index == 0 and first is not None:
                mixed = image_to_tokens_projected(layer.cross_attn_image_to_token, image_queries, rows, weight,
                                                  queries + query_pe, queries, keys)
            else:
                mixed = image_to_tokens(layer.cross_attn_image_to_token, k, queries + query_pe, queries, keys)
            keys = _image_norm(mixed, layer.norm4)
        attended = tokens_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys + key_pe, keys)
        return transformer.norm_final_attn(queries + attended), keys

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input, *projections):
        """projections (with precomputed=True): PageImageGraph(image_embeddings)'s outputs."""
        decoder = self.mask_decoder
        sparse = embed_points(self.prompt_encoder, self.image_size, point_coords, point_labels)[0]  # N, C
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)  # T, C
        tokens = torch.cat([output_tokens, sparse], dim=0)
        h, w = self.prompt_encoder.image_embedding_size
        rows, weight = self.dense_rows(mask_input, has_mask_input)
        # the image side: the embedding channels-last plus the dense embedding
        keys = torch.addmm(image_embeddings.flatten(2)[0].transpose(0, 1), rows, weight)  # h*w, C
        if self.precomputed:
            if len(projections) != len(PROJECTIONS):
                raise ValueError(f"the precomputed page graph takes {', '.join(PROJECTIONS)} after the prompt")
            hs, keys = self.transformer(keys, tokens, first=(rows, weight, *projections))
        else:
            hs, keys = self.transformer(keys, tokens)
        mask_tokens = hs[1 : 1 + decoder.num_mask_tokens]
        hyper_in = torch.stack([mlp(mask_tokens[i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)])  # M, C/8
        up1, norm, act1, up2, act2 = decoder.output_upscaling
        x = _conv_transpose_2x2(keys, up1)  # h*w, (dy1, dx1), C/4
        x = act1(_channel_norm(x, norm))
        x = act2(_conv_transpose_2x2(x, up2))  # h*w, (dy1, dx1), (dy2, dx2), C/8
        m, channels = decoder.num_mask_tokens, up2.weight.shape[1]
        # The upscaled features on the product's left (the side the matrix kernels do not repack).
        logits = x.reshape(-1, channels) @ hyper_in.transpose(0, 1)  # h*w*16, M
        # output pixel (4i + 2 dy1 + dy2, 4j + 2 dx1 + dx2), in one transpose
        masks = logits.view(h, w, 2, 2, 2, 2, m).permute(6, 0, 2, 4, 1, 3, 5).reshape(1, m, 4 * h, 4 * w)
        iou = decoder.iou_prediction_head(hs[0])[None]
        return iou, masks


# PageImageGraph's outputs, PageDecoderGraph(precomputed=True)'s inputs after the prompt's.
PROJECTIONS = ("t2i_keys", "t2i_values", "i2t_queries")


class PageImageGraph(nn.Module):
    """image_embeddings (1, C, h, w) -> the first two-way block's image-side projections, made once per image
    for PageDecoderGraph(precomputed=True): t2i_keys (H, d, h*w) = the token-to-image attention's k_proj
    weight times (x + pe), t2i_values (H, h*w, d) = its v_proj weight times x, i2t_queries (H, h*w, d) = the
    image-to-token attention's q_proj weight times (x + pe); x the image embedding, pe the positional
    encoding, no biases (the prompt's graph adds them, and the mask input's dense embedding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        reason = page_graph_unsupported(model)
        if reason is not None:
            raise ValueError(f"no folded page decoder: {reason}")
        self.layer = model.mask_decoder.transformer.layers[0]
        image_pe = model.prompt_encoder.get_dense_pe().detach()  # 1, C, h, w
        self.register_buffer("image_pe", image_pe[0].flatten(1), persistent=False)  # C, h*w

    def forward(self, image_embeddings: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        to_image, to_tokens = self.layer.cross_attn_token_to_image, self.layer.cross_attn_image_to_token
        image = image_embeddings.flatten(2)[0]  # C, h*w: the embedding's own layout, no transpose
        with_pe = image + self.image_pe

        def heads(attn: nn.Module, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # (H, d, h*w)
            return (proj.weight @ x).view(attn.num_heads, attn.internal_dim // attn.num_heads, -1)

        keys_t = heads(to_image, to_image.k_proj, with_pe)
        values = heads(to_image, to_image.v_proj, image).transpose(1, 2)
        queries = heads(to_tokens, to_tokens.q_proj, with_pe).transpose(1, 2)
        return keys_t, values, queries
