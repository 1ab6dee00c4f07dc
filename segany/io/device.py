"""The torch device a user asked for, checked before anything is loaded onto it."""
from __future__ import annotations

from typing import Union

import torch


def check_device(device: Union[str, torch.device]) -> torch.device:
    """A torch.device that exists here, or a ValueError in one line that says what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) is built without CUDA; "
                             "use --device cpu or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is visible; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev
