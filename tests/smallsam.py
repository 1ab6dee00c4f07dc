"""A very small random SAM for fast unit tests: 256-pixel input (16x16 embedding, 64x64 low-res masks),
ViT embed 32 / depth 2 with window 4, and a 64-wide decoder. Not the released size on purpose: the code
must follow whatever the config says."""
from __future__ import annotations

import numpy as np
import torch

from segany.modeling import ImageEncoderConfig, MaskDecoderConfig, SamConfig, build_sam


def small_config() -> SamConfig:
    return SamConfig(
        encoder=ImageEncoderConfig(
            img_size=256, embed_dim=32, depth=2, num_heads=2, out_chans=64, window_size=4, global_attn_indexes=(1,)
        ),
        prompt_embed_dim=64,
        mask_in_chans=16,
        decoder=MaskDecoderConfig(transformer_mlp_dim=128, iou_head_hidden_dim=64),
    )


def small_sam(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_sam(small_config())
    # Default init leaves the logits near zero; larger random weights give varied, prompt-dependent masks.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and "norm" not in name:
                p.mul_(2.0)
    return model.eval()


def make_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A structured RGB image (gradients, a disc and a square) so prompts at different places differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 255 * xx / max(w - 1, 1)
    img[..., 1] = 255 * yy / max(h - 1, 1)
    img[..., 2] = 80
    disc = (xx - 0.35 * w) ** 2 + (yy - 0.4 * h) ** 2 < (0.2 * min(h, w)) ** 2
    img[disc] = (230, 40, 60)
    img[int(0.6 * h) : int(0.9 * h), int(0.55 * w) : int(0.85 * w)] = (30, 200, 90)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def one_thread():
    """Generator for a module-scoped fixture: tiny models run fastest on one thread (and the machine's
    cores are shared), so these tests use one and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
