"""CLIP checkpoints: OpenAI's released TorchScript archives and open_clip's state dicts of the same layout.

OpenAI's `ViT-B-32.pt` is a TorchScript archive: a zip whose `data.pkl` pickles the module tree
(objects of `__torch__.*` classes holding their parameters as attributes) with the tensors' bytes in
`data/<key>`. torch.jit.load would run the archive's code; this reader runs none: a restricted unpickler
accepts only those module placeholders, the tensor-rebuild call and storage types, and maps each storage
to the bytes of its file, as torch.load(weights_only=True) does for plain checkpoints.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..modeling.clip import CLIP, config_from_state_dict, is_clip_state_dict
from .checkpoint import read_state_dict
from .errors import CheckpointError

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]

# Attributes OpenAI's archives hold beside the weights (its own loader deletes them, then loads strictly).
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptModule:
    """Placeholder for a pickled `__torch__.*` object: keeps its attributes, runs nothing."""

    def __init__(self, *args) -> None:
        self.attributes: dict = {}

    def __setstate__(self, state) -> None:
        self.attributes = dict(state) if isinstance(state, dict) else {}


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *rest) -> torch.Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _WeightsUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix
        self.storages: Dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _ScriptModule
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a weights archive")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if flat.numel() < numel:
                raise CheckpointError(f"tensor data {key} is shorter than its {numel} elements: the archive is damaged")
            self.storages[key] = flat
        return self.storages[key]


def is_torchscript_archive(archive: zipfile.ZipFile) -> bool:
    names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names) and any(n.endswith("/data.pkl") for n in names)


def _collect(obj: object, prefix: str, out: StateDict) -> None:
    if isinstance(obj, _ScriptModule):
        for name, value in obj.attributes.items():
            _collect(value, f"{prefix}{name}.", out)
    elif isinstance(obj, torch.Tensor):
        out[prefix[:-1]] = obj


def read_torchscript_weights(path: PathLike) -> StateDict:
    """The tensors of a TorchScript archive by their module paths, without running its code."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1)
            prefix = pkl.rsplit("/", 1)[0]
            root = _WeightsUnpickler(archive.read(pkl), archive, prefix).load()
    except (zipfile.BadZipFile, KeyError, EOFError, StopIteration, pickle.UnpicklingError, ValueError, OSError,
            RuntimeError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{path} is not a readable TorchScript weights archive ({type(exc).__name__}: {exc})") from None
    sd: StateDict = {}
    _collect(root, "", sd)
    return sd


def _zip_data_pkl(path: Path) -> Optional[bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1), None)
            return archive.read(pkl) if pkl else None
    except (zipfile.BadZipFile, OSError, KeyError):
        return None


def looks_like_clip(path: PathLike) -> bool:
    """Whether a checkpoint holds a CLIP model, from its index alone (the tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        try:
            with open(path, "rb") as handle:
                n = int.from_bytes(handle.read(8), "little")
                header = handle.read(n) if 0 < n < 100_000_000 else b""
            keys = json.loads(header or b"{}")
        except (OSError, ValueError):
            return False
        return any(k.endswith("text_projection") for k in keys) and any("visual.conv1" in k for k in keys)
    index = _zip_data_pkl(path)
    return index is not None and b"token_embedding" in index and b"text_projection" in index and b"conv1" in index


def read_clip_state_dict(path: PathLike) -> StateDict:
    """OpenAI's TorchScript archive, or a state dict (.pt/.pth/.bin/.safetensors; open_clip's training
    checkpoints nest it under "state_dict" with a "module." prefix), as float32 tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"CLIP checkpoint not found: {path}")
    torchscript = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            torchscript = is_torchscript_archive(archive)
    sd = read_torchscript_weights(path) if torchscript else read_state_dict(path)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    for key in _NOT_WEIGHTS:
        sd.pop(key, None)
    if not is_clip_state_dict(sd):
        raise CheckpointError(f"{path} is not a CLIP checkpoint (no visual.conv1 / token_embedding / text_projection)")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def clip_from_state_dict(sd: StateDict, source: object = "CLIP checkpoint") -> CLIP:
    try:
        cfg = config_from_state_dict(sd)
    except (KeyError, IndexError) as exc:
        raise CheckpointError(f"{source} lacks {exc}: not a ViT CLIP checkpoint, or it is damaged") from None
    model = CLIP(cfg)
    expected = model.state_dict()
    # Tensors the released modules keep as plain attributes (the text tower's causal mask) are not weights.
    extra = [k for k in sd if k not in expected and not k.endswith("attn_mask")]
    missing = [k for k in expected if k not in sd]
    if extra or missing:
        raise CheckpointError(
            f"{source} does not fit CLIP {cfg.vision.patch_size}px-patch ViT: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    bad = [k for k in expected if sd[k].shape != expected[k].shape]
    if bad:
        raise CheckpointError(f"{source}: tensor {bad[0]} has shape {tuple(sd[bad[0]].shape)}, expected {tuple(expected[bad[0]].shape)}")
    model.load_state_dict({k: sd[k] for k in expected}, strict=True)
    return model.eval()


def load_clip(name_or_path: PathLike, mode: str = "exact", device: Union[str, torch.device] = "cpu") -> CLIP:
    """A CLIP model from a file or a zoo name ("clip_vit_b32", downloaded once), float32 unless mode="fast"."""
    from .models import MODES, resolve_checkpoint

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    path = resolve_checkpoint(name_or_path)
    model = clip_from_state_dict(read_clip_state_dict(path), source=f"CLIP checkpoint {path}").to(device)
    model.checkpoint_path = str(path)
    model.mode = "exact"
    if mode == "fast":
        from ..engine.clip import make_fast

        make_fast(model)
    return model
