"""FastSAM / YOLOv8-seg checkpoints: the released ultralytics `.pt` files, or a state dict with the
released key names (.pth / .pt / .safetensors, e.g. written by `save_checkpoint(model, "x.safetensors")`)."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Optional, Union

from ..modeling.yolov8_seg import FASTSAM_CONFIGS, YoloV8Seg, build_yolov8_seg, config_from_state_dict, scale_name
from .errors import CheckpointError
from .ultralytics_pickle import is_ultralytics_checkpoint, read_ultralytics_checkpoint

PathLike = Union[str, os.PathLike]

_MARKER_KEY = "model.22.proto.cv1.conv.weight"  # only YOLO segmentation heads have this


def is_fastsam_file(path: PathLike) -> bool:
    """Whether a checkpoint holds a YOLOv8-seg model (without unpickling anything)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return _MARKER_KEY in handle.keys()
        except Exception:
            return False
    if is_ultralytics_checkpoint(path):
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return pkl is not None and _MARKER_KEY.encode() in archive.read(pkl)
    except (zipfile.BadZipFile, OSError):
        return False


def load_fastsam(path: PathLike, expect: Optional[str] = None) -> YoloV8Seg:
    """A float32 YoloV8Seg in eval mode. `expect` ('fastsam-s', 'fastsam-x') checks the scale."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    claimed = None
    if path.suffix != ".safetensors" and is_ultralytics_checkpoint(path):
        ckpt = read_ultralytics_checkpoint(path)
        sd = ckpt.state_dict
        claimed = ckpt.claimed_scale
    else:
        from .checkpoint import read_state_dict

        sd = read_state_dict(path)
    try:
        cfg = config_from_state_dict(sd)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    if claimed is not None and cfg.name != f"yolov8{claimed}-seg":
        raise CheckpointError(
            f"checkpoint {path} says it is yolov8{claimed}-seg but its weights are {_describe(cfg)}"
        )
    expect = {"fastsam": "fastsam-x"}.get(expect, expect.replace("_", "-")) if expect else None
    if expect is not None and expect in FASTSAM_CONFIGS:
        want = FASTSAM_CONFIGS[expect]
        if (want.widths, want.depths) != (cfg.widths, cfg.depths):
            raise CheckpointError(f"checkpoint {path} was loaded as {expect} ({want.name}) but holds {_describe(cfg)}")
    model = build_yolov8_seg(cfg)
    from .checkpoint import load_state_dict_into

    load_state_dict_into(model, sd, source=f"checkpoint {path}")
    model.checkpoint_path = str(path)
    return model.eval()


def _describe(cfg) -> str:
    name = scale_name(cfg)
    return f"{name} weights (widths {list(cfg.widths)})" if name != "custom" else f"weights of widths {list(cfg.widths)}"
