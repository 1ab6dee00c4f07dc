"""Read and write SAM checkpoints (.pth / .pt state dicts and .safetensors) with the released key names,
and infer the architecture from the state dict alone."""
from __future__ import annotations

import copy
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from ..modeling import ImageEncoderConfig, MaskDecoderConfig, SamConfig, build_sam
from .atomic import atomic_write
from .errors import CheckpointError

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------- reading


def _brief(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, shortened: torch's unpickling errors span many lines."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def read_state_dict(path: PathLike) -> StateDict:
    """Load a state dict from .pth/.pt (plain or wrapped in {'model': ...}) or .safetensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is truncated or not a safetensors file ({_brief(exc)})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint ({type(exc).__name__}: {_brief(exc)})"
        ) from None
    except Exception as exc:  # an unpickler refusal of an unsafe object, say
        raise CheckpointError(f"checkpoint {path} could not be read safely ({type(exc).__name__}: {_brief(exc)})") from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: object, source: object = "checkpoint") -> StateDict:
    """Accept a plain state dict, or the {'model': sd} / {'state_dict': sd} wrappers training code writes."""
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    return obj


# ---------------------------------------------------------------- architecture inference


def _count_indexed(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in sd for m in [pattern.match(key)] if m}
    return max(indices) + 1 if indices else 0


def _require(sd: StateDict, key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"missing key {key!r}: this is not a SAM checkpoint, or it is damaged")
    return sd[key]


def infer_decoder_config(sd: StateDict, cfg: SamConfig) -> SamConfig:
    """Prompt-encoder and mask-decoder sizes, shared by every variant."""
    cfg.prompt_embed_dim = _require(sd, "prompt_encoder.no_mask_embed.weight").shape[1]
    cfg.mask_in_chans = _require(sd, "prompt_encoder.mask_downscaling.3.weight").shape[0]
    cfg.decoder = MaskDecoderConfig(
        transformer_depth=_count_indexed(sd, "mask_decoder.transformer.layers."),
        transformer_mlp_dim=_require(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0],
        num_multimask_outputs=_require(sd, "mask_decoder.mask_tokens.weight").shape[0] - 1,
        iou_head_depth=_count_indexed(sd, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=_require(sd, "mask_decoder.iou_prediction_head.layers.0.weight").shape[0],
    )
    return cfg


def infer_vit_config(sd: StateDict) -> Optional[SamConfig]:
    """The ViT encoder of SAM: every size is readable from tensor shapes.

    Heads come from the relative-position tables (their width is the head dim); the global blocks are
    the ones whose table spans the whole grid rather than one window.
    """
    if "image_encoder.patch_embed.proj.weight" not in sd or "image_encoder.blocks.0.norm1.weight" not in sd:
        return None
    patch = sd["image_encoder.patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = _count_indexed(sd, "image_encoder.blocks.")
    use_abs_pos = "image_encoder.pos_embed" in sd
    if use_abs_pos:
        grid = sd["image_encoder.pos_embed"].shape[1]
    else:
        grid = 1024 // patch_size
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in sd
    global_blocks: List[int] = []
    window_size = 14
    num_heads = max(1, embed_dim // 64)
    if use_rel_pos:
        head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        num_heads = embed_dim // head_dim
        windows = set()
        for i in range(depth):
            span = (_require(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h").shape[0] + 1) // 2
            if span == grid:
                global_blocks.append(i)
            else:
                windows.add(span)
        if len(windows) > 1:
            raise CheckpointError(f"blocks use different window sizes {sorted(windows)}; not a SAM ViT")
        if windows:
            window_size = windows.pop()
    encoder = ImageEncoderConfig(
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=_require(sd, "image_encoder.blocks.0.mlp.lin1.weight").shape[0] / embed_dim,
        out_chans=_require(sd, "image_encoder.neck.0.weight").shape[0],
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
        use_abs_pos=use_abs_pos,
        use_rel_pos=use_rel_pos,
        window_size=window_size,
        global_attn_indexes=tuple(global_blocks),
    )
    return infer_decoder_config(sd, SamConfig(encoder=encoder, encoder_kind="vit"))


# Tried in order; variants (MobileSAM, HQ-SAM) put theirs first since their keys are more specific.
CONFIG_INFERERS: List[Callable[[StateDict], Optional[SamConfig]]] = [infer_vit_config]

# encoder_kind / variant -> model builder, for variants whose model class is not plain Sam.
MODEL_BUILDERS: Dict[str, Callable[[SamConfig], nn.Module]] = {}


def infer_config(sd: StateDict) -> SamConfig:
    for infer in CONFIG_INFERERS:
        cfg = infer(sd)
        if cfg is not None:
            return cfg
    sample = ", ".join(list(sd)[:3])
    raise CheckpointError(f"unrecognised checkpoint layout (first keys: {sample}); expected a SAM state dict")


def build_model(cfg: SamConfig) -> nn.Module:
    builder = MODEL_BUILDERS.get(getattr(cfg, "variant", "sam"))
    return builder(cfg) if builder else build_sam(cfg)


# ---------------------------------------------------------------- loading into a module


def check_state_dict(model: nn.Module, sd: StateDict, source: object = "checkpoint") -> None:
    """Raise a CheckpointError naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    for key in missing[:5]:
        problems.append(f"missing key {key!r} (expected shape {tuple(expected[key].shape)})")
    for key in unexpected[:5]:
        problems.append(f"unexpected key {key!r} (shape {tuple(sd[key].shape)})")
    for key in expected:
        if key in sd and tuple(sd[key].shape) != tuple(expected[key].shape):
            problems.append(
                f"shape mismatch for {key!r}: expected {tuple(expected[key].shape)}, got {tuple(sd[key].shape)}"
            )
    if problems:
        more = len(missing) + len(unexpected) - min(len(missing), 5) - min(len(unexpected), 5)
        tail = f" (and {more} more missing/unexpected keys)" if more > 0 else ""
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems[:10]) + tail)
    check_finite(sd, source)


def check_finite(sd: StateDict, source: object = "checkpoint") -> None:
    """Raise a CheckpointError if a weight is NaN or infinite (such a model would print 'score nan')."""
    bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{source} has NaN or infinite weights in {', '.join(map(repr, bad[:3]))}{more}: "
                              "the file is damaged or comes from a diverged training run")


def load_state_dict_into(model: nn.Module, sd: StateDict, source: object = "checkpoint") -> nn.Module:
    check_state_dict(model, sd, source)
    dtype = next(model.parameters()).dtype
    converted = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(converted, strict=True)
    return model


def model_from_state_dict(sd: StateDict, config: Optional[SamConfig] = None, source: object = "checkpoint") -> nn.Module:
    cfg = copy.deepcopy(config) if config is not None else infer_config(sd)
    model = build_model(cfg)
    load_state_dict_into(model, sd, source)
    return model.eval()


def load_checkpoint(path: PathLike, config: Optional[SamConfig] = None) -> nn.Module:
    """A float32 model, in eval mode, from a checkpoint file; the architecture is inferred unless given."""
    sd = read_state_dict(path)
    model = model_from_state_dict(sd, config, source=f"checkpoint {path}")
    model.checkpoint_path = str(path)
    return model


# ---------------------------------------------------------------- writing


def save_checkpoint(model_or_sd: Union[nn.Module, StateDict], path: PathLike, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the released key layout to .pth/.pt or .safetensors (by suffix), atomically."""
    path = Path(path)
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else dict(model_or_sd)
    sd = {k: v.detach().to("cpu") for k, v in sd.items()}
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save({k: v.contiguous().clone() for k, v in sd.items()})
        with atomic_write(path) as handle:
            handle.write(data)
    elif path.suffix in (".pth", ".pt", ".bin"):
        with atomic_write(path) as handle:
            torch.save(sd, handle)
    else:
        raise ValueError(f"unknown checkpoint format {path.suffix!r}: use .pth, .pt or .safetensors")
    return path
