"""Recognise MobileSAM and HQ-SAM checkpoints by their keys, and build them.

Registered at import (segany.io imports this module): the inferer goes to the front of
CONFIG_INFERERS, HQ-SAM's builder into MODEL_BUILDERS under its variant name "hq".
"""
from __future__ import annotations

import math
from typing import Optional

from ..modeling.config import SamConfig
from ..modeling.hq_sam import build_hq_sam
from ..modeling.tiny_vit import TinyViTConfig
from .checkpoint import (
    CONFIG_INFERERS,
    MODEL_BUILDERS,
    StateDict,
    _count_indexed,
    _require,
    infer_decoder_config,
    infer_vit_config,
)
from .errors import CheckpointError

HQ_KEY = "mask_decoder.hf_token.weight"
TINY_VIT_KEY = "image_encoder.layers.0.blocks.0.conv1.c.weight"


def infer_tiny_vit_encoder(sd: StateDict) -> TinyViTConfig:
    """Every TinyViT size except the input resolution is readable from tensor shapes; the released
    models all take 1024x1024 images (a checkpoint does not record it)."""
    enc = "image_encoder."
    stages = _count_indexed(sd, enc + "layers.")
    if stages < 2:
        raise CheckpointError("TinyViT checkpoint has fewer than two stages")
    stem = _require(sd, enc + "patch_embed.seq.0.c.weight")
    dims, depths, heads, windows = [], [], [], []
    for i in range(stages):
        depths.append(_count_indexed(sd, f"{enc}layers.{i}.blocks."))
        if i == 0:
            # The convolutional stage has no heads or windows; keep the released placeholders so that
            # a released checkpoint's config equals mobile_sam_config().
            dims.append(_require(sd, TINY_VIT_KEY).shape[1])
            heads.append(TinyViTConfig.num_heads[0])
            windows.append(TinyViTConfig.window_sizes[0])
            continue
        biases = _require(sd, f"{enc}layers.{i}.blocks.0.attn.attention_biases")
        window = math.isqrt(biases.shape[1])
        if window * window != biases.shape[1]:
            raise CheckpointError(f"stage {i}: attention biases {tuple(biases.shape)} are not one per window offset")
        dims.append(_require(sd, f"{enc}layers.{i}.blocks.0.attn.norm.weight").shape[0])
        heads.append(biases.shape[0])
        windows.append(window)
    first_attention = f"{enc}layers.1.blocks.0."
    head = sd.get(enc + "head.weight")
    return TinyViTConfig(
        in_chans=stem.shape[1],
        embed_dims=tuple(dims),
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_sizes=tuple(windows),
        mlp_ratio=_require(sd, first_attention + "mlp.fc1.weight").shape[0] / dims[1],
        mbconv_expand_ratio=_require(sd, TINY_VIT_KEY).shape[0] / dims[0],
        local_conv_size=_require(sd, first_attention + "local_conv.c.weight").shape[-1],
        out_chans=_require(sd, enc + "neck.0.weight").shape[0],
        num_classes=head.shape[0] if head is not None else 0,
    )


def infer_variant_config(sd: StateDict) -> Optional[SamConfig]:
    """MobileSAM (TinyViT keys), HQ-SAM (HQ token keys) on either encoder; None for anything else."""
    tiny = TINY_VIT_KEY in sd
    hq = HQ_KEY in sd
    if tiny:
        cfg = infer_decoder_config(sd, SamConfig(encoder=infer_tiny_vit_encoder(sd), encoder_kind="tiny_vit"))
    elif hq:
        cfg = infer_vit_config(sd)
        if cfg is None:
            raise CheckpointError("HQ-SAM checkpoint without a recognisable image encoder")
    else:
        return None
    cfg.variant = "hq" if hq else "sam"
    return cfg


if infer_variant_config not in CONFIG_INFERERS:
    CONFIG_INFERERS.insert(0, infer_variant_config)
MODEL_BUILDERS["hq"] = build_hq_sam
