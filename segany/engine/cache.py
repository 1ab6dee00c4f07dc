"""Values derived from tensors (usually parameters), kept until those tensors change."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


def tensor_version(tensor: torch.Tensor) -> Optional[int]:
    """In-place modification counter (None for inference-mode tensors, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def kept_until_changed(owner: Any, slot: str, tensors: Sequence[torch.Tensor], build: Callable[[], T]) -> T:
    """build(), kept on `owner` (a module or a tensor: outside any state dict) under `slot` until any of
    `tensors` is replaced or modified in place (its storage, version counter, dtype or device changes)."""
    try:
        key = [(t.data_ptr(), t._version, t.dtype, t.device) for t in tensors]
    except RuntimeError:  # an inference-mode tensor (no version counter)
        key = [(t.data_ptr(), tensor_version(t), t.dtype, t.device) for t in tensors]
    cached = owner.__dict__.get(slot)
    if cached is None or cached[0] != key:
        cached = (key, build())
        owner.__dict__[slot] = cached
    return cached[1]
