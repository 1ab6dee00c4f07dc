"""Low-rank adapters (Hu et al., 2021) on the image encoder's attention qkv projections.

y = W x + b + (alpha / r) * B A x, with A (r, in) random and B (out, r) zero so training starts at
the original model. `merge_lora` folds B A into W and puts plain nn.Linear modules back, so the
result is an ordinary model with the released key layout.
"""
from __future__ import annotations

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight, for code that reads `.weight` directly."""
        return self.base.weight + self.scaling * (self.lora_b @ self.lora_a)

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        out = out.to(device=self.base.weight.device, dtype=self.base.weight.dtype)
        out.weight.copy_(self.weight)
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def add_lora(model: nn.Module, rank: int = 4, alpha: float = 4.0, target: str = "qkv") -> List[LoRALinear]:
    """Wrap every `<...>.attn.<target>` nn.Linear of model.image_encoder; returns the adapters."""
    adapters = []
    for _, module in list(model.image_encoder.named_modules()):
        child = getattr(module, target, None)
        if isinstance(child, nn.Linear) and hasattr(module, "num_heads"):
            adapter = LoRALinear(child, rank, alpha)
            setattr(module, target, adapter)
            adapters.append(adapter)
    if not adapters:
        raise ValueError(f"no attention '{target}' projections found in the image encoder for LoRA")
    return adapters


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` (in place) by its merged nn.Linear; returns the model."""
    for _, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]
