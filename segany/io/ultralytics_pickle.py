"""Read released FastSAM / YOLOv8-seg `.pt` files (pickled ultralytics model objects) without ultralytics.

The file is a torch zip whose pickle names ultralytics classes (`ultralytics.nn.tasks.SegmentationModel`,
`ultralytics.nn.modules.block.C2f`, ...), torch.nn modules and `builtins.getattr`. It is read with
torch's restricted (weights-only) unpickler, which builds objects only from admitted globals and never
calls arbitrary code; every `ultralytics.*` global is admitted as an inert stand-in (an nn.Module or a
namespace that only holds the pickled state), torch.nn module classes as themselves, and
`builtins.getattr` as an inert function that returns a placeholder for attribute lookups on the
stand-ins. Any other global is refused before anything is unpickled, naming it.

The weights are then taken from the restored module tree's state dict (released key names).
"""
from __future__ import annotations

import os
import pickle
import re
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from .errors import CheckpointError

PathLike = Union[str, os.PathLike]

_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class _UltralyticsModule(nn.Module):
    """Stand-in for a pickled ultralytics module: only the state the pickle restores."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # never run
        raise RuntimeError(f"{type(self).__module__}.{type(self).__qualname__} is an inert stand-in")


class _UltralyticsNamespace(types.SimpleNamespace):
    """Stand-in for ultralytics' IterableSimpleNamespace (the training arguments)."""


class _Attribute:
    """What `getattr(stand_in_class, name)` unpickles to: a named placeholder, never the attribute."""

    def __init__(self, owner: str, name: str) -> None:
        self.owner, self.name = owner, name

    def __repr__(self) -> str:
        return f"<attribute {self.owner}.{self.name} (not loaded)>"


def _inert_getattr(obj: Any, name: Any, *default: Any) -> _Attribute:
    stand_in = isinstance(obj, type) and issubclass(obj, (_UltralyticsModule, _UltralyticsNamespace))
    if not stand_in or not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise pickle.UnpicklingError(f"refused builtins.getattr({obj!r}, {name!r}) in the checkpoint's pickle")
    return _Attribute(f"{obj.__module__}.{obj.__qualname__}", name)


def _stand_in(qualified: str) -> type:
    module, _, qualname = qualified.rpartition(".")
    base = _UltralyticsNamespace if qualname.endswith("Namespace") else _UltralyticsModule
    return type(qualname, (base,), {"__module__": module})


def _torch_module_class(qualified: str) -> Optional[type]:
    """A torch.nn module class named `torch.nn.modules.<file>.<Class>`, or None."""
    module, _, qualname = qualified.rpartition(".")
    if not module.startswith("torch.nn.modules.") or not _IDENTIFIER.match(qualname):
        return None
    import importlib

    try:
        cls = getattr(importlib.import_module(module), qualname, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def admitted_globals(names: List[str]) -> List[Any]:
    """The (object, name) pairs to admit for the globals a checkpoint references; refuses the rest."""
    admitted: List[Any] = []
    for name in names:
        if name.startswith("ultralytics."):
            admitted.append((_stand_in(name), name))
        elif name == "builtins.getattr":
            admitted.append((_inert_getattr, name))
        elif _torch_module_class(name) is not None:
            admitted.append((_torch_module_class(name), name))
        else:
            raise CheckpointError(
                f"refused global {name!r} in the checkpoint: an ultralytics checkpoint may only reference "
                "ultralytics classes, torch.nn modules and tensors"
            )
    return admitted


@dataclass
class UltralyticsCheckpoint:
    state_dict: Dict[str, torch.Tensor]
    yaml: Dict[str, Any] = field(default_factory=dict)
    names: Dict[int, str] = field(default_factory=dict)
    version: str = ""
    train_args: Dict[str, Any] = field(default_factory=dict)

    @property
    def claimed_scale(self) -> Optional[str]:
        """The scale the file says it is ('s', 'x', ...), from the model's yaml, if it says."""
        scale = self.yaml.get("scale") if isinstance(self.yaml, dict) else None
        if isinstance(scale, str) and scale:
            return scale
        yaml_file = self.yaml.get("yaml_file") if isinstance(self.yaml, dict) else None
        match = re.search(r"yolov8([nslmx])-seg", str(yaml_file or ""))
        return match.group(1) if match else None


def is_ultralytics_checkpoint(path: PathLike) -> bool:
    """Whether a torch zip file's pickle names an ultralytics model class (without unpickling it)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                return False
            with archive.open(pkl) as handle:
                return b"ultralytics" in handle.read(1 << 16)
    except (zipfile.BadZipFile, OSError):
        return False


def read_ultralytics_checkpoint(path: PathLike) -> UltralyticsCheckpoint:
    """Unpickle a released FastSAM/YOLOv8 `.pt` file safely and take its weights (float32)."""
    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # a truncated or corrupted zip
        raise CheckpointError(f"cannot read {path}: not a complete torch checkpoint ({_one_line(exc)})") from None
    admitted = admitted_globals(names)
    try:
        with torch.serialization.safe_globals(admitted):
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {_one_line(exc)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), nn.Module):
        raise CheckpointError(f"{path} is not an ultralytics checkpoint: no 'model' module in it")
    model = ckpt["model"]
    sd = {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}
    yaml = getattr(model, "yaml", None)
    names_map = getattr(model, "names", None)
    train_args = ckpt.get("train_args") if isinstance(ckpt.get("train_args"), dict) else {}
    return UltralyticsCheckpoint(
        state_dict=sd,
        yaml=yaml if isinstance(yaml, dict) else {},
        names=dict(names_map) if isinstance(names_map, dict) else {},
        version=str(ckpt.get("version", "")),
        train_args=train_args,
    )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
