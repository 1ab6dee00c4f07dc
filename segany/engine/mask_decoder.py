"""The mask decoder at inference: the image side prepared once per image, only the selected mask
tokens decoded, the upscaling and hypernetwork product fused (banded, or through the compiled
kernel), prompts one at a time on a CPU (see docs/architecture.md). Twins of
segany.modeling.mask_decoder's modules: same parameters, same step names (transformer,
output_upscaling, output_hypernetworks_mlps, iou_prediction_head)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import mask_decoder as plain
from ..modeling.common import LayerNorm2d
from .cache import kept_until_changed
from .kernels import fusable_activation, linear
from .transformer import ImageSide
from .twin import UNBOUND, chosen_at_build, register


def conv_transpose_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A stride-2, 2x2 transposed convolution on channels-last (B, h, w, Cin) -> (B, 2h, 2w, Cout).

    Each input pixel maps to its own 2x2 output block, so this is one matrix product followed by a
    shuffle of contiguous channel vectors; much faster on a CPU than the generic kernel.
    """
    b, h, w, _ = x.shape
    y = conv_transpose_2x2_blocks(x, conv).view(b, h, w, 2, 2, conv.out_channels)
    return y.permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, conv.out_channels)


def conv_transpose_2x2_blocks(
    x: torch.Tensor, conv: nn.ConvTranspose2d, matrix: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
) -> torch.Tensor:
    """The same transposed convolution without the shuffle: (..., Cin) -> (..., 4, Cout), each input
    pixel's 2x2 output block in (dy, dx) order. `matrix`: conv_transpose_2x2_matrix(conv), if kept."""
    weight, bias = conv_transpose_2x2_matrix(conv) if matrix is None else matrix
    return F.linear(x, weight, bias).view(*x.shape[:-1], 4, conv.out_channels)


def conv_transpose_2x2_matrix(
    conv: nn.ConvTranspose2d, dx_first: bool = False
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The transposed convolution's weight as a linear layer's ((dy, dx, Cout), Cin) matrix, and bias;
    with dx_first its rows ordered (dx, dy, Cout)."""
    c_in, c_out = conv.in_channels, conv.out_channels
    weight = conv.weight.permute(0, 3, 2, 1) if dx_first else conv.weight.permute(0, 2, 3, 1)
    weight = weight.reshape(c_in, 4 * c_out).t()
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    return weight, bias


class MaskUpscaling(plain.MaskUpscaling):
    """ConvT(2x2, s2) -> LayerNorm2d -> act -> ConvT(2x2, s2) -> act, as released (same keys).

    forward takes and returns NCHW tensors; internally it runs channels-last (see conv_transpose_2x2) and
    returns a channels-last-strided NCHW view, which `mask_logits` reads without a copy.

    `masks` goes further for the hypernetwork dot product: every input pixel owns a 4x4 block of output
    pixels, and everything after the first convolution is per pixel, so the upscaled features are never
    shuffled into image order as a whole: the sub-pixels are ordered on the way (see _band_logits_into)
    so that only the few mask logits are copied into place; the work runs over bands of rows that stay
    in cache.
    """

    # Input pixels per band, for 4-byte floats (twice as many for 2-byte ones): 1024 pixels of a 64-wide
    # input are 16 rows, 16384 upscaled pixels. More, smaller bands cost more in per-call overhead
    # than they gain in cache.
    BAND_PIXELS = 1024
    ROWS_PER_BAND: Optional[int] = None  # fixed rows per band instead (tests)

    paths = UNBOUND
    # Chosen by the weights' dtype (the fast mode's bulk) when the engine is built: a bfloat16 upscaling
    # folds its layer norm into the first convolution and, where the kernels loaded, runs compiled.
    in_bfloat16 = chosen_at_build(lambda m, paths: m[0].weight.dtype == torch.bfloat16)
    native_upscaling = chosen_at_build(lambda m, paths: paths.native is not None and m[0].weight.dtype == torch.bfloat16)

    def _band_rows(self, x: torch.Tensor) -> int:
        if self.ROWS_PER_BAND is not None:
            return self.ROWS_PER_BAND
        return max(1, self.BAND_PIXELS * 4 // (x.element_size() * x.shape[2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, C, h, w -> B, C/8, 4h, 4w
        up1, norm, act1, up2, act2 = self
        x = conv_transpose_2x2(x.permute(0, 2, 3, 1), up1)
        x = act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = act2(conv_transpose_2x2(x, up2))
        return x.permute(0, 3, 1, 2)

    def _matrices(self, second_dx_first: bool = False) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Both convolutions as linear-layer matrices (the second one's rows ordered (dx, dy, C/8) with
        second_dx_first); outside autograd kept until the weights change (rebuilt per band and call
        they were a tenth of the upscaling's time)."""
        convs = (self[0], self[3])

        def build() -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
            return [conv_transpose_2x2_matrix(convs[0]), conv_transpose_2x2_matrix(convs[1], second_dx_first)]

        params = [p for conv in convs for p in conv.parameters()]
        return kept_until_changed(self, f"_matrix_cache_{int(second_dx_first)}", params, build)

    def _folded_norm(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For the banded inference path: the first convolution's matrix and bias with the layer norm's
        centring and gain folded in (gain * (W - mean over each sub-pixel's C/4 outputs)), and 1/gain^2
        as a (C/4, 1) column; kept until the weights change. None where a gain is zero or not finite
        (1/gain^2 would not be), or the norm is not the released LayerNorm2d."""
        up1, norm = self[0], self[1]
        if not isinstance(norm, LayerNorm2d):
            return None
        params = [up1.weight, norm.weight] + ([] if up1.bias is None else [up1.bias])  # (what the fold reads)

        def fold() -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            weight, bias = conv_transpose_2x2_matrix(up1)
            gain = norm.weight.detach().float()
            inverse_gain_squared = gain.square().reciprocal()
            if not bool(torch.isfinite(inverse_gain_squared).all()):
                return None
            c_out = up1.out_channels
            weight = weight.detach().float().view(4, c_out, -1)
            weight = (weight - weight.mean(1, keepdim=True)) * gain[:, None]
            if bias is None:
                bias = torch.zeros(4 * c_out)
            bias = bias.detach().float().view(4, c_out)
            bias = (bias - bias.mean(1, keepdim=True)) * gain
            dtype = up1.weight.dtype
            return (
                weight.reshape(4 * c_out, -1).to(dtype),
                bias.reshape(-1).to(dtype),
                inverse_gain_squared[:, None].to(dtype),
            )

        return kept_until_changed(self, "_folded_norm_cache", params, fold)

    def _blocked_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, r, w, C) channels-last -> (B, r, w, 4, 4, C/8): each pixel's upscaled 4x4 block, order
        (dy1, dx1) of the first convolution then (dy2, dx2) of the second."""
        up1, norm, act1, up2, act2 = self
        matrix1, matrix2 = self._matrices()
        y = conv_transpose_2x2_blocks(x, up1, matrix1)  # B, r, w, 4, C/4
        y = act1(F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps))
        return act2(conv_transpose_2x2_blocks(y, up2, matrix2))  # B, r, w, 4, 4, C/8

    def _band_logits(self, x: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Logits of a band of rows x (B, r, w, C) in blocked order: (B, T, r, w, dy1, dx1, (dy2, dx2))."""
        b, r, w, _ = x.shape
        feats = self._blocked_features(x)  # B, r, w, 4, 4, C/8
        logits = hyper @ feats.view(b, -1, feats.shape[-1]).transpose(1, 2)  # B, T, r*w*16
        return logits.view(b, hyper.shape[1], r, w, 2, 2, 4)

    def masks(self, x: torch.Tensor, hyper: torch.Tensor, region: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Mask logits hyper . upscale(x): x (B, h, w, C) channels-last, hyper (B, T, C/8) -> (B, T, 4h, 4w).

        The same products as forward() followed by mask_logits(), without the two pixel shuffles of the
        (B, 4h, 4w, C/8) features. Outside autograd the logits come out in float32 whatever the
        module's dtype (the cast rides on the copy into place), and every band's logits go through the
        same scratch buffer.

        region (rows, cols): only the logits of the first `rows` x `cols` pixels of x, the top-left
        (4 rows, 4 cols) of the result, zeros elsewhere: each pixel's 4x4 block depends on that pixel
        alone, so these are the products of a full call (their sums may round differently for the other
        shapes). For callers that read only the un-padded part of the image (everything mode's crops).
        Outside autograd only."""
        b, h, w, _ = x.shape
        t = hyper.shape[1]
        rows_in, cols_in = (h, w) if region is None else (min(h, int(region[0])), min(w, int(region[1])))
        if not self.paths.cpu:  # one band, one shuffle
            # (the bands below are for a CPU's caches; a GPU runs the whole at once)
            hyper = hyper.to(x.dtype)
            logits = self._band_logits(x, hyper).view(b, t, h, w, 2, 2, 2, 2)
            logits = logits.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, t, 4 * h, 4 * w)
            logits = logits.float()  # what the banded path returns
            if region is not None:
                logits[..., 4 * rows_in :, :] = 0
                logits[..., :, 4 * cols_in :] = 0
            return logits
        new_out = torch.zeros if (rows_in, cols_in) != (h, w) else torch.empty
        out = new_out(b, t, 4 * h, 4 * w, dtype=torch.float32, device=x.device)
        packed = self._native_weights() if self.native_upscaling else None
        if packed is not None:
            self._native_masks_into(out, x, hyper, rows_in, cols_in, packed)
            return out
        hyper = hyper.to(x.dtype)  # (float32 tokens' weights on the fast mode's bfloat16 image side)
        band_rows = self._band_rows(x)
        # Per band, the logits of each dy2 half (see _band_logits_into) before they are copied into place.
        scratch = x.new_empty(2, t, 8 * min(rows_in, band_rows) * cols_in)
        for i in range(b):
            for r0 in range(0, rows_in, band_rows):
                band = x[i, r0 : min(r0 + band_rows, rows_in), :cols_in]
                target = out[i, :, 4 * r0 : 4 * (r0 + band.shape[0]), : 4 * cols_in]
                self._band_logits_into(band, hyper[i], target, scratch)
        return out

    # The compiled kernel (segany.engine.native, csrc/decoder_bf16.c) for the bfloat16 inference path:
    # a few pixels at a time through both convolutions, the norm, the GELUs and the hypernetwork
    # product, only the logits written. Its intermediates stay in float32 (the second convolution's
    # input excepted), so it is closer to the float32 result than the banded path below
    # (tests/test_native.py).

    def _native_weights(self) -> Optional[Tuple[torch.Tensor, ...]]:
        """The weights packed for the kernel (see csrc/decoder_bf16.c), kept until they change; None
        where the kernel cannot run: a structure other than SAM's
        (ConvT 2x2/2 to C/4 channels, LayerNorm2d, exact GELU, ConvT 2x2/2 to C/8, GELU; C/4 = 64)."""
        up1, norm, act1, up2, act2 = self
        convs_ok = all(
            type(conv) is nn.ConvTranspose2d
            and conv.kernel_size == (2, 2)
            and conv.stride == (2, 2)
            and conv.padding == (0, 0)
            and conv.output_padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.bias is not None
            for conv in (up1, up2)
        )
        gelus_ok = all(type(act) is nn.GELU and act.approximate == "none" for act in (act1, act2))
        if not (convs_ok and gelus_ok and type(norm) is LayerNorm2d):
            return None
        if up1.out_channels != 64 or up2.in_channels != 64 or up2.out_channels != 32 or up1.in_channels % 2:
            return None
        params = [up1.weight, up1.bias, norm.weight, norm.bias, up2.weight, up2.bias]

        def pack() -> Tuple[torch.Tensor, ...]:
            c_in, c1, c2 = up1.in_channels, up1.out_channels, up2.out_channels
            w1, _ = conv_transpose_2x2_matrix(up1)  # rows (dy1, dx1, c1)
            w1p = w1.detach().reshape(4, c1, c_in // 2, 2).permute(0, 2, 1, 3)  # s1, k pair, c1, 2
            w2 = up2.weight.detach().permute(1, 2, 3, 0).reshape(4 * c2, c1)  # rows (c2, dy2, dx2)
            w2p = w2.reshape(4 * c2, c1 // 2, 2).permute(1, 0, 2)  # k pair, (c2, dy2, dx2), 2
            as_float = [t.detach().float().contiguous() for t in (up1.bias, norm.weight, norm.bias)]
            b2x = up2.bias.detach().float().repeat_interleave(4).contiguous()
            return (
                w1p.to(torch.bfloat16).contiguous(),
                *as_float,
                w2p.to(torch.bfloat16).contiguous(),
                b2x,
            )

        return kept_until_changed(self, "_native_cache", params, pack)

    def _native_masks_into(
        self, out: torch.Tensor, x: torch.Tensor, hyper: torch.Tensor, rows_in: int, cols_in: int, packed: Tuple[torch.Tensor, ...]
    ) -> None:
        """masks() through the compiled kernel: the logits of the top-left rows_in x cols_in pixels of x
        (B, h, w, C) bfloat16 for hyper (B, T, C/8), written into out (B, T, 4h, 4w) float32."""
        if rows_in <= 0 or cols_in <= 0:
            return
        w1p, b1, gain, beta, w2p, b2x = packed
        b, h, w, c = x.shape
        # Each hypernetwork value repeated for the 4 sub-pixels of the kernel's registers.
        hyper_x = hyper.detach().float().repeat_interleave(4, dim=-1).contiguous()  # B, T, 4 C/8
        threads = torch.get_num_threads()
        for i in range(b):
            side = x[i].contiguous()
            self.paths.native.segany_upscale_logits_bf16(
                side.data_ptr(), h, w, c, rows_in, cols_in,
                w1p.data_ptr(), b1.data_ptr(), gain.data_ptr(), beta.data_ptr(), float(self[1].eps),
                w2p.data_ptr(), b2x.data_ptr(), hyper_x[i].data_ptr(), hyper.shape[1], out[i].data_ptr(), threads,
            )  # fmt: skip

    def _band_logits_into(self, x: torch.Tensor, hyper: torch.Tensor, target: torch.Tensor, scratch: torch.Tensor) -> None:
        """The logits of one image side's band x (r, w, C) for hyper (T, C/8), written in image order into
        `target` (T, 4r, 4w) (a float32 view of the output); scratch (2, T, >= 8 r w) in x's dtype.

        The sub-pixels are put in image order on the way rather than shuffled at the end: the first
        convolution's sub-pixel rows (r, w, dy1, dx1) are normalised into rows (r, dy1, w, dx1), and the
        second convolution's columns are ordered (dx2, dy2, c), so that for each dy2 its outputs are one
        strided matrix whose rows run (r, dy1, w, dx1, dx2): the hypernetwork product of each dy2 is
        already in image order, rows of 4w logits apart from its dy2 rows. The convolutions run through
        kernels.linear (the second one's GELU applied by its kernel)."""
        up1, norm, act1, up2, act2 = self
        (w1, b1), (w2, b2) = self._matrices(second_dx_first=True)
        r, w, c = x.shape
        n = r * w
        c1, c2 = up1.out_channels, up2.out_channels
        folded = self._folded_norm() if self.in_bfloat16 else None
        if folded is None:
            y1 = linear(x.reshape(n, c), w1, b1).view(n * 4, -1)  # sub-pixels (r, w, dy1, dx1), C/4
            spare, y1 = y1, F.layer_norm(y1, (c1,), norm.weight, norm.bias, norm.eps)
        else:
            # The layer norm with its centring and gain folded into the first convolution: that gives
            # gain * (y1 - mean(y1)) per sub-pixel; the sums of squares of y1 - mean come from it by one
            # product with 1/gain^2, and what is left of the norm is one scaling per row plus the bias.
            scaled_weight, scaled_bias, inverse_gain_squared = folded
            spare = linear(x.reshape(n, c), scaled_weight, scaled_bias).view(n * 4, -1)  # sub-pixels, C/4
            y1 = spare.square()  # (its buffer then takes the norm's output)
            rstd = (y1 @ inverse_gain_squared).mul_(1.0 / c1).add_(norm.eps).rsqrt_()  # (sub-pixels, 1)
            torch.addcmul(norm.bias, spare, rstd, out=y1)
        # Rows (r, w, dy1, dx1) -> (r, dy1, w, dx1) in a copy of runs of C/4 (11 us a band here, where the
        # norm writing its output in that order, strided, took 40 us longer), into the buffer of the
        # convolution's output, which the norm has consumed: fewer bytes through the caches per band.
        normed = spare.view(r, 2, w, 2, c1)
        normed.permute(0, 2, 1, 3, 4).copy_(y1.view(r, w, 2, 2, c1))
        _activate_in_place(act1, normed)
        fused = fusable_activation(act2)  # applied by the product's kernel as it writes
        y2 = linear(normed.view(n * 4, c1), w2, b2, activation=fused)  # (r, dy1, w, dx1) x (dx2, dy2, C/8)
        if fused is None:
            _activate_in_place(act2, y2)
        halves = y2.view(n * 8, 2, c2)  # rows (r, dy1, w, dx1, dx2), dy2, C/8
        logits = scratch[:, :, : 8 * n]  # dy2, T, (r, dy1, w, dx1, dx2)
        if not self.in_bfloat16:  # float32: one batched product, MKL reads the strided halves as they are
            torch.matmul(hyper, halves.permute(1, 2, 0), out=logits)
        else:  # bfloat16 batched products copy strided operands first; two products do not
            for dy2 in range(2):
                torch.mm(hyper, halves[:, dy2].t(), out=logits[dy2])
        rows = target.view(target.shape[0], 2 * r, 2, target.shape[-1])  # T, (r, dy1), dy2, (w, dx1, dx2)
        rows.copy_(logits.view(2, -1, 2 * r, 4 * w).permute(1, 2, 0, 3))


def _activate_in_place(act: nn.Module, x: torch.Tensor) -> None:
    """act(x) written over x: the same kernels for the activations SAM uses, any other one via a copy."""
    if type(act) is nn.GELU:
        torch.ops.aten.gelu_(x, approximate=act.approximate)
    elif type(act) is nn.ReLU:
        torch.relu_(x)
    else:
        x.copy_(act(x))


def mask_logits(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """hyper_in (B, T, c) . upscaled (B, c, H, W) over c -> (B, T, H, W), whatever upscaled's layout."""
    b, c, h, w = upscaled.shape
    hyper_in = hyper_in.to(upscaled.dtype)
    if upscaled.permute(0, 2, 3, 1).is_contiguous():
        flat = upscaled.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of the channels-last data
        return (flat @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
    return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)


# Prompts decoded together outside autograd (see MaskDecoder.predict_masks).
INFERENCE_MICRO_BATCH = 1


def _batch_rows(x: torch.Tensor, start: int, size: int, batch: int) -> torch.Tensor:
    """Rows start:start+size of a per-prompt tensor; a tensor shared by all prompts (batch 1) as it is."""
    if x is not None and x.shape[0] == batch and batch != 1:
        return x[start : start + size]
    return x


class MaskDecoder(plain.MaskDecoder):
    paths = UNBOUND

    @property
    def token_dtype(self) -> torch.dtype:
        """The dtype the tokens' side (output and prompt tokens, attention projections, heads) runs in."""
        return self.iou_token.weight.dtype

    @property
    def image_dtype(self) -> torch.dtype:
        """The dtype the image side (embedding + dense prompt, PE, upscaling) runs in."""
        return self.output_upscaling[0].weight.dtype

    def bulk_modules(self) -> List[nn.Module]:
        """The modules whose cost is their size rather than their dispatch: those run over every image
        position (the output upscaling) and the transformer's MLPs, whose weights are most of the
        decoder's bytes (read once per decode for a few tokens). The fast mode runs these in bfloat16
        and the rest (a few tokens through small layers) in float32."""
        mlps = [layer.mlp for layer in getattr(self.transformer, "layers", [])]
        return [self.output_upscaling] + mlps

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        image_side: Optional[ImageSide] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns low-res mask logits (B, 3 or 1, 256, 256) and IoU predictions (B, 3 or 1).

        image_side: from shared_image_side() for this image, PE and dense prompt (prepared once per image
        and re-used); image_embeddings and image_pe may then be None."""
        selected = slice(1, None) if multimask_output else slice(0, 1)
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_side, selected
        )
        return masks, iou_pred[:, selected]

    def tokens_with(self, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """The transformer's token sequence: the output tokens, then the prompt tokens (B, N, C), in the
        tokens' dtype."""
        batch = sparse_prompt_embeddings.shape[0]
        return torch.cat([self.output_tokens(batch), sparse_prompt_embeddings.to(self.token_dtype)], dim=1)

    @staticmethod
    def expand_to_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
        """One image embedding serves every prompt; a per-prompt batch is used as it is."""
        if x.shape[0] == batch:
            return x
        if x.shape[0] != 1:
            raise ValueError(f"image batch {x.shape[0]} does not match prompt batch {batch}")
        return x.expand(batch, *x.shape[1:])

    def add_dense_prompt(self, image_embeddings: torch.Tensor, dense_prompt_embeddings: torch.Tensor, batch: int) -> torch.Tensor:
        """Image embedding + dense prompt, (B, C, h, w); batch 1 when every prompt shares it (one image and
        no mask prompt: the dense prompt is one broadcast embedding), so the image side is computed once."""
        dtype = self.image_dtype
        image_embeddings, dense = image_embeddings.to(dtype), dense_prompt_embeddings.to(dtype)
        if image_embeddings.shape[0] == 1 and (dense.shape[0] == 1 or dense.stride(0) == 0):
            return image_embeddings + dense[:1]
        return self.expand_to_batch(image_embeddings, batch) + dense

    def shared_image_side(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        project: bool = True,
    ) -> ImageSide:
        """The transformer's image side for one image (1, C, h, w) and a dense prompt shared by every
        prompt (the "no mask" embedding), in this decoder's dtype: what forward() would compute from the
        same tensors on every call, to be kept with the image embedding and passed as image_side.
        project: also the first block's projections of it (see TwoWayTransformer.prepare)."""
        if image_embeddings.shape[0] != 1 or not (dense_prompt_embeddings.shape[0] == 1 or dense_prompt_embeddings.stride(0) == 0):
            raise ValueError("a shared image side needs one image embedding and one dense prompt for every prompt")
        src = self.add_dense_prompt(image_embeddings, dense_prompt_embeddings[:1], 1)
        return self.transformer.prepare(src, image_pe[:1].to(self.image_dtype), project=project)

    def hypernetwork_weights(self, mask_tokens_out: torch.Tensor, which: slice = slice(None)) -> torch.Tensor:
        """Each mask token through its own MLP: (B, T, C) -> (B, T, C/8). `which`: the mask tokens that
        mask_tokens_out holds (all by default), whose MLPs to use."""
        mlps = self.output_hypernetworks_mlps
        if any(mlp.sigmoid_output for mlp in mlps):
            hyper: List[torch.Tensor] = [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(mlps[which])]
            return torch.stack(hyper, dim=1)  # B, T, C/8
        # At inference the T MLPs run as one batched product per layer (12 small products were 12
        # dispatches of a few microseconds' work each), in float32 whatever the decoder's dtype: for
        # these few rows a bfloat16 batched product is 3x slower (it packs its operands on every call),
        # and bfloat16 values are exact in float32. Same arithmetic per token (more exact in between).
        x = mask_tokens_out.transpose(0, 1).float()  # T, B, C
        layers = self._stacked_hypernetworks()
        for i, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias[which], x, weight[which])  # T, B, out
            if i < len(layers) - 1:
                x = torch.relu_(x)
        return x.transpose(0, 1).to(mask_tokens_out.dtype)

    def _stacked_hypernetworks(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the T hypernetwork MLPs' weights (T, in, out) and biases (T, 1, out) in float32,
        kept until any of them changes."""
        mlps = self.output_hypernetworks_mlps

        def stack() -> List[Tuple[torch.Tensor, torch.Tensor]]:
            return [
                (
                    torch.stack([mlp.layers[i].weight.t().float() for mlp in mlps]),
                    torch.stack([mlp.layers[i].bias[None].float() for mlp in mlps]),
                )
                for i in range(mlps[0].num_layers)
            ]

        tensors = [t for mlp in mlps for layer in mlp.layers for t in layer._parameters.values() if t is not None]
        return kept_until_changed(self, "_hypernetwork_cache", tensors, stack)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_side: Optional[ImageSide] = None,
        mask_tokens: slice = slice(None),
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mask logits (B, T', 4h, 4w) of the mask tokens `mask_tokens` selects (all T by default: only
        these are upscaled) and the IoU predictions of all T."""
        batch = sparse_prompt_embeddings.shape[0]
        if image_side is None and image_embeddings.shape[0] == 1:
            dense = dense_prompt_embeddings
            if dense.shape[0] == 1 or dense.stride(0) == 0:  # one image side for every prompt: prepare it once
                # (its projections pay for themselves from about three prompts on)
                image_side = self.shared_image_side(image_embeddings, image_pe, dense, project=batch >= 3)
        if batch > INFERENCE_MICRO_BATCH and self.paths.cpu:
            # Each prompt carries its own (h*w, C) image side through the transformer and the upscaling;
            # on a CPU these are memory-bound, and one prompt's working set fits in cache where 64 do not:
            # prompts one at a time run faster per prompt than in one batch (same results).
            # (A GPU takes the whole batch at once.)
            parts = [
                self.predict_masks(
                    _batch_rows(image_embeddings, start, INFERENCE_MICRO_BATCH, batch),
                    _batch_rows(image_pe, start, INFERENCE_MICRO_BATCH, batch),
                    sparse_prompt_embeddings[start : start + INFERENCE_MICRO_BATCH],
                    _batch_rows(dense_prompt_embeddings, start, INFERENCE_MICRO_BATCH, batch),
                    image_side,
                    mask_tokens,
                )
                for start in range(0, batch, INFERENCE_MICRO_BATCH)
            ]
            return torch.cat([m for m, _ in parts]), torch.cat([i for _, i in parts])
        # Only the IoU token and the selected mask tokens go through the final attention and the
        # hypernetworks: a multimask decode skips mask token 0 (the single-mask output), a single-mask
        # decode the other three.
        selected = range(self.num_mask_tokens)[mask_tokens]
        hs, src = self.run_two_way(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, image_side,
            outputs=[0] + [1 + i for i in selected],
        )
        hyper = self.hypernetwork_weights(hs[:, 1:, :], mask_tokens)
        masks = self.output_upscaling.masks(src, hyper)
        iou_pred = self.iou_prediction_head(hs[:, 0, :])
        return masks, iou_pred

    def run_transformer(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output tokens after the two-way transformer (B, T, C) and the upscaled image side (B, C/8, 4h, 4w).

        Token order: IoU token, the mask tokens, then whatever a variant's output_tokens adds (prompt tokens dropped).
        """
        hs, src = self.run_two_way(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings)
        upscaled = self.output_upscaling(src.permute(0, 3, 1, 2))  # B, C/8, 4h, 4w
        return hs, upscaled

    def run_two_way(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        image_side: Optional[ImageSide] = None,
        outputs: Optional[Sequence[int]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Output tokens after the two-way transformer (B, T, C; prompt tokens dropped), or those of
        `outputs` (indices into the output tokens, in that order), and the image side (B, h, w, C),
        channels-last."""
        batch = sparse_prompt_embeddings.shape[0]
        tokens = self.tokens_with(sparse_prompt_embeddings)
        if image_side is None:
            src = self.add_dense_prompt(image_embeddings, dense_prompt_embeddings, batch)
            # The positional encoding is the same for every prompt: the transformer broadcasts batch 1.
            pe = image_pe[:1] if image_pe.shape[0] > 1 else image_pe
            image_side = self.transformer.prepare(src, pe.to(self.image_dtype))
        n_out = tokens.shape[1] - sparse_prompt_embeddings.shape[1]  # IoU, mask (and a variant's) tokens
        hs, src = self.transformer.run(image_side, tokens, n_out if outputs is None else outputs)
        return hs, src.reshape(batch, *image_side.size, src.shape[-1])


register(plain.MaskUpscaling, MaskUpscaling)
register(plain.MaskDecoder, MaskDecoder)
