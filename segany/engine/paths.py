"""The paths an engine takes, chosen once when it is built.

An engine is built for a device and a mode: `EnginePaths.build(device)` decides, from the device and
whether this process has oneDNN and segany's compiled kernels (segany.engine.native), which
implementation each step runs, and `bind(net, paths)` hands that choice to every module of the
engine's twin (`module.paths`; a module whose choice also depends on its own weights' dtype, fixed
by the mode's precision policy, declares it with twin.chosen_at_build). A CPU build binds the CPU paths (oneDNN
products, bands, chunks, one prompt at a time, the compiled kernels where they loaded); any other
device binds plain PyTorch (F.linear, one fused attention, whole batches). The modules then run what
was bound: they do not ask per call which device their tensors are on, or whether the library
loaded. What still depends on the data (how many tokens or rows, the kernels' size limits) is
decided per call (docs/architecture.md).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import kernels, native, rel_pos_softmax
from .twin import chosen_at_build


@dataclass(frozen=True)
class EnginePaths:
    device: torch.device
    # The CPU paths (bands, chunks, micro-batches, oneDNN); False: plain PyTorch for a GPU.
    cpu: bool
    # segany's compiled kernels (csrc/decoder_bf16.c) where they loaded on a CPU build, else None.
    native: Optional[ctypes.CDLL]
    # The image encoder's attention kernels (csrc/attention_softmax.c) where they loaded on a CPU build, else None.
    attention_kernels: Optional[ctypes.CDLL]
    # The products of the engine's layers: kernels.linear (oneDNN) on a CPU, kernels.plain_linear elsewhere.
    linear: Callable[..., torch.Tensor]
    # Products of a few bfloat16 rows with a small layer's weights (kernels.matmul_weight), and the
    # float32 copy of such a weight (kernels.float32_weight_for); plain ones elsewhere.
    matmul_weight: Callable[..., torch.Tensor]
    float32_weight_for: Callable[..., Optional[torch.Tensor]]

    @staticmethod
    def build(device: Any) -> "EnginePaths":
        """The paths for `device`: on a CPU the CPU paths, with the compiled kernels where they load."""
        device = torch.device(device)
        if device.type != "cpu":
            return EnginePaths.plain(device)
        return EnginePaths(
            device=device,
            cpu=True,
            native=native.library(),
            attention_kernels=rel_pos_softmax.library(),
            linear=kernels.linear,
            matmul_weight=kernels.matmul_weight,
            float32_weight_for=kernels.float32_weight_for,
        )

    @staticmethod
    def plain(device: Any) -> "EnginePaths":
        """Plain PyTorch, what a GPU (any device but a CPU) runs; on a CPU too, for tests of those paths."""
        return EnginePaths(
            device=torch.device(device),
            cpu=False,
            native=None,
            attention_kernels=None,
            linear=kernels.plain_linear,
            matmul_weight=kernels.plain_matmul_weight,
            float32_weight_for=kernels.no_float32_weight,
        )

    def __reduce__(self):
        # (a loaded library cannot be pickled: an unpickled engine chooses again where it lands)
        return (EnginePaths.build, (self.device,)) if self.cpu else (EnginePaths.plain, (self.device,))


def bind(net: nn.Module, paths: EnginePaths) -> nn.Module:
    """Give every module of an engine's twin `paths`, and store each choice its class makes by its own
    weights (segany.engine.twin.chosen_at_build). Call again after the twin's weights change dtype."""
    for module in net.modules():
        module.paths = paths
    rebind(net)
    return net


def rebind(net: nn.Module) -> None:
    """Make the modules' own choices again with the paths they hold (after a change of their weights'
    dtype: segany.engine.twin.own_weights_in calls it)."""
    for module in net.modules():
        paths = module.__dict__.get("paths")
        if paths is None:
            continue
        for name, choice in _choices(type(module)):
            module.__dict__[name] = choice.choose(module, paths)


@functools.lru_cache(maxsize=None)
def _choices(cls: type) -> Tuple[Tuple[str, chosen_at_build], ...]:
    found: Dict[str, chosen_at_build] = {}
    for klass in reversed(cls.__mro__):
        found.update({name: value for name, value in vars(klass).items() if isinstance(value, chosen_at_build)})
    return tuple(found.items())
