"""Low-res logits of recent decodes, kept so that the page can refine a mask by reference."""
from __future__ import annotations

import base64
import secrets
import threading
from collections import OrderedDict
from typing import Tuple

import numpy as np


class LogitsCache:
    """Low-res logits of recent decodes, so the page can refine a mask without shipping 256x256 floats."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._items: "OrderedDict[str, Tuple[int, np.ndarray]]" = OrderedDict()
        self._lock = threading.Lock()

    def put(self, image_id: int, logits: np.ndarray) -> str:
        token = secrets.token_urlsafe(12)
        with self._lock:
            self._items[token] = (image_id, logits)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return token

    def get(self, token: str, image_id: int, index: int) -> np.ndarray:
        with self._lock:
            item = self._items.get(token)
        if item is None:
            raise ValueError("mask_input token is unknown or expired; decode again without it")
        owner, logits = item
        if owner != image_id:
            raise ValueError("mask_input token belongs to another image")
        if index >= logits.shape[0]:
            raise ValueError(f"mask_input index {index} out of range ({logits.shape[0]} candidates)")
        return logits[index]


def mask_from_b64(text: str, size: Tuple[int, int]) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("mask_input_b64 is not valid base64") from None
    expected = size[0] * size[1] * 4
    if len(raw) != expected:
        raise ValueError(f"mask_input_b64 must hold {size[0]}x{size[1]} float32 values ({expected} bytes), got {len(raw)}")
    return np.frombuffer(raw, dtype="<f4").reshape(size).astype(np.float32)
