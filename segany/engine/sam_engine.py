"""SamEngine: SAM, MobileSAM and HQ-SAM at inference, built once from a model and a mode.

The model (segany.modeling) is the plain definition; the engine runs it through a twin of it
(segany.engine.twin) whose modules carry the inference paths: the prepared image side, the folded
cross-attentions, the compiled kernels, micro-batching, the fused upscaling and resize. In the fast
mode the twin holds bfloat16 copies of the encoder's and the decoder bulk's weights (the precision
policy: segany.engine.precision); the engine's inputs and outputs are float32 in both modes.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

# The engine modules register themselves with the twin on import.
from . import common, hq_sam, image_encoder, mask_decoder, prompt_encoder, sam, tiny_vit, transformer  # noqa: F401
from .precision import FAST_DTYPE, cast_floats, convert_twin, model_mode
from .paths import EnginePaths, bind
from .resize import resize_natively, upscale_logits_opencv
from .sam import low_res_region
from .twin import twin

MODES = ("exact", "fast")


class SamEngine:
    """Inference for a SAM-family model. `mode`: "exact" (float32, the released results) or "fast"
    (bfloat16 encoder and decoder bulk); by default the mode the model was loaded for."""

    def __init__(self, model: nn.Module, mode: Optional[str] = None) -> None:
        mode = model_mode(model) if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self.model = model
        self.mode = mode
        self.dtype = FAST_DTYPE if mode == "fast" else torch.float32
        self._build()

    def _build(self) -> None:
        # The paths, chosen once for the model's device (segany.engine.paths): a CPU build binds the
        # CPU paths and the compiled kernels where they loaded, any other device plain PyTorch.
        self.paths = EnginePaths.build(self.model.device)
        self.net = twin(self.model, paths=self.paths)
        if self.mode == "fast":
            convert_twin(self.net, self.dtype)
            bind(self.net, self.paths)  # the modules that choose by their weights' dtype choose again
        # The fast mode's resize of masks to the image on a CPU: compiled where the kernels loaded,
        # else OpenCV; elsewhere, and in the exact mode, the released two steps.
        self.resize_on_cpu = self.fast and self.paths.cpu
        self.resize_natively = self._resize_with_kernels if self.paths.native is not None else self._no_kernels

    def _for_the_model(self) -> None:
        """An engine is built for its model's device: for a model moved since, it is built again."""
        if self.model.device != self.paths.device:
            self._build()

    # ------------------------------------------------------------ what callers read

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def fast(self) -> bool:
        return self.mode == "fast"

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.preprocess(x)

    # ------------------------------------------------------------ steps

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Preprocessed (B, 3, S, S) images -> float32 image features (see Sam.encode)."""
        self._for_the_model()
        features = self.net.encode(cast_floats(images, self.dtype))
        return cast_floats(features, torch.float32)

    @torch.no_grad()
    def decode(
        self,
        features: Dict[str, torch.Tensor],
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
        multimask_output: bool,
        cache: Optional[Dict[str, Any]] = None,
        **options: Any,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Prompts in the model's input frame -> float32 low-res logits (B, C, 256, 256) and IoU (B, C).
        `cache`: a dict kept with these features, where the decoder's image side is prepared once."""
        self._for_the_model()
        if "hq_token_only" not in options and hasattr(self.model, "hq_token_only"):
            # HQ-SAM's model-wide default, read from the model as it is now (set after the engine was built).
            options["hq_token_only"] = self.model.hq_token_only
        out = self.net.decode(features, points, boxes, masks, multimask_output, cache=cache, **options)
        return cast_floats(out, torch.float32) if self.fast else out

    @torch.no_grad()
    def upscale(
        self,
        low_res: torch.Tensor,
        input_size: Tuple[int, int],
        original_size: Tuple[int, int],
        threshold: Optional[float] = None,
    ) -> torch.Tensor:
        """Low-res logits (..., 256, 256) -> logits at the original image size, or with `threshold` the
        masks logits > threshold. The fast mode resizes on a CPU through the compiled kernel where it is
        available (the released two steps' composite), else with OpenCV; the exact mode as released."""
        self._for_the_model()
        size = self.image_size
        if self.resize_on_cpu and low_res_region(low_res.shape[-2:], size, input_size) is not None:
            args = (low_res, input_size, original_size, size, threshold)
            resized = self.resize_natively(*args)  # (None where the kernel does not apply to these sizes)
            return resized if resized is not None else upscale_logits_opencv(*args)
        full = self.net.postprocess_masks(low_res, input_size, original_size)
        return full if threshold is None else full > threshold

    def _resize_with_kernels(self, *args: Any) -> Optional[torch.Tensor]:
        return resize_natively(self.paths.native, *args)

    @staticmethod
    def _no_kernels(*args: Any) -> None:
        return None

    # ------------------------------------------------------------ everything mode

    @property
    def can_decode_above(self) -> bool:
        """Whether decode_above() applies: the plain SAM mask decoder (exact or fast mode)."""
        return type(self.net.mask_decoder) is mask_decoder.MaskDecoder and type(self.net) is sam.Sam

    @torch.no_grad()
    def decode_above(
        self,
        coords: torch.Tensor,
        labels: torch.Tensor,
        iou_threshold: float,
        *,
        features: Dict[str, torch.Tensor],
        input_size: Tuple[int, int],
        cache: Dict[str, Any],
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One-point prompts (N, 1, 2) in the input frame, decoded with masks only for the outputs whose
        predicted IoU passes `iou_threshold` (everything mode).

        Returns iou (N, 3) of the multimask outputs, flat_index (K,) = point * 3 + output of the outputs
        with iou > iou_threshold (all of them when iou_threshold <= 0), ascending, and their low-res
        logits (K, 256, 256) in that order. On a CPU point by point: the two-way transformer and the IoU
        head, then the output upscaling and hypernetwork products only for a point with a passing
        output, while that point's image side is still in cache; only the low-res pixels the un-padded
        image needs are upscaled (the padding's rows and columns are zero). The values are those of a
        full decode. On a GPU the whole batch is decoded at once and the passing outputs picked."""
        if not self.can_decode_above:
            raise ValueError("decode_above needs the plain SAM mask decoder")
        self._for_the_model()
        if not self.paths.cpu:
            low, iou = self.decode(features, (coords, labels), None, None, True, cache=cache)
            iou = iou.float()
            flat = iou.flatten()
            if iou_threshold <= 0:
                keep = torch.arange(len(flat), device=flat.device)
            else:
                keep = torch.nonzero(flat > iou_threshold).flatten()
            return iou, keep.cpu(), low.flatten(0, 1)[keep].float()
        net = self.net
        dec = net.mask_decoder
        sparse, dense = net.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        batch = sparse.shape[0]
        tokens = dec.tokens_with(sparse)
        # The image side shared by every point, prepared once per embedding (in the decoder's dtype).
        side = net.cached_image_side(cache, features["image_embeddings"], net.prompt_encoder.get_dense_pe(), dense)
        h, w = side.size
        # Each decoder pixel owns a 4x4 block of low-res logits: only those of the un-padded image.
        region = low_res_region((4 * h, 4 * w), net.image_size, input_size)
        upscaled = None if region is None else (-(-region[2] // 4), -(-region[3] // 4))
        ious: List[torch.Tensor] = []
        index: List[int] = []
        logits: List[torch.Tensor] = []
        # The multimask outputs: mask tokens 1..3 (token 0 is the single-mask output), rows 2..4 after the IoU token.
        transformer_, outputs = dec.transformer, slice(1, 1 + dec.num_multimask_outputs)
        rows = slice(1 + outputs.start, 1 + outputs.stop)
        for i in range(batch):
            point_tokens = tokens[i : i + 1]
            queries, keys = transformer_.run_blocks(side, point_tokens)
            # The final attention treats tokens independently: the IoU token first, the mask tokens only
            # for a point with a passing output.
            iou_token = transformer_.final_attention(queries[:, :1], point_tokens[:, :1], keys, side=side)
            iou = dec.iou_prediction_head(iou_token[:, 0, :])[0, 1:].float()
            ious.append(iou)
            passing = torch.arange(3) if iou_threshold <= 0 else torch.nonzero(iou > iou_threshold).flatten()
            if len(passing) == 0:
                continue
            mask_tokens = transformer_.final_attention(queries[:, rows], point_tokens[:, rows], keys, side=side)
            hyper = dec.hypernetwork_weights(mask_tokens, outputs)[:, passing]
            logits.append(dec.output_upscaling.masks(keys.view(1, h, w, -1), hyper, region=upscaled)[0].float())
            index.extend((3 * i + passing).tolist())
        iou_all = torch.stack(ious) if ious else torch.zeros(0, 3)
        if not logits:
            return iou_all, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4 * h, 4 * w)
        return iou_all, torch.tensor(index, dtype=torch.int64), torch.cat(logits)


def build_engine(model: nn.Module, mode: Optional[str] = None) -> SamEngine:
    """The engine for a SAM-family model (SAM, MobileSAM, HQ-SAM)."""
    return SamEngine(model, mode)
