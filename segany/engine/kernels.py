"""Linear layers for inference on the CPU through oneDNN.

PyTorch sends a float32 linear layer or matrix product on the CPU to MKL's sgemm; for SAM's shapes
(thousands of rows: image tokens, bands of attention logits) oneDNN's kernels compute the same float32
products faster on an AVX-512 CPU (figures in docs/benchmarks.md) and can
apply a GELU or add a residual while the output is still in cache. The sums run in another order,
so results differ from F.linear's by float32 rounding (~1e-6 relative). bfloat16 products already
go to oneDNN in PyTorch; here they skip a few copies and get the same fusions, except a few rows
(the decoder's tokens) through a small layer, which run as float32 products of the same values
(_small_bfloat16_linear).

`linear` is for the engine's inference on a CPU (no autograd, no tracing: training and ONNX export run
the plain modules); tiny float32 products (where MKL's small-matrix path is quicker) take F.linear. An
engine built for another device binds `plain_linear` instead (segany.engine.paths).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache import kept_until_changed
from .twin import UNBOUND, register


# Switch for comparisons (tests, benchmarks): False sends every product to F.linear.
ENABLED = True
# float32 products of fewer multiply-adds than this stay with F.linear (MKL is quicker for tiny ones,
# such as a few tokens through a 256 x 256 layer: 16 against 36 us here).
MIN_FLOAT32_MACS = 1 << 20
# bfloat16 products of fewer rows than this with a layer's weights of at most SMALL_WEIGHT elements
# run as float32 products of the same values (see _small_bfloat16_linear).
SMALL_BFLOAT16_ROWS = 64
SMALL_WEIGHT = 256 * 256
ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
ACTIVATIONS = ("gelu",)


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build has oneDNN, with bfloat16 support where `dtype` is bfloat16."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=None)
def onednn_usable(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build has oneDNN's linear op and it computes what F.linear does."""
    try:
        if not onednn_supports(dtype):
            return False
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(80, 24, generator=generator).to(dtype)
        w = torch.randn(16, 24, generator=generator).to(dtype)
        b = torch.randn(16, generator=generator).to(dtype)
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            expected = F.linear(x.float(), w.float(), b.float())
        return bool(torch.allclose(got.float(), expected, rtol=1e-2, atol=1e-2))
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def onednn_packed_usable(dtype: torch.dtype) -> bool:
    """Whether oneDNN's linear op takes a weight packed once for its kernels (_reorder_linear_weight)
    and, with it, computes what F.linear does, alone and with its post-ops: ReLU, GELU, SiLU ("swish")
    and a residual add (what the Semantic-SAM engine's products and CLIP's fast tower use)."""
    try:
        if not onednn_supports(dtype):
            return False
        generator = torch.Generator().manual_seed(0)
        x, w, b, r = (torch.randn(*shape, generator=generator).to(dtype) for shape in ((40, 24), (16, 24), (16,), (40, 16)))
        with torch.no_grad():
            ops = torch.ops.mkldnn
            packed = ops._reorder_linear_weight(w, x.shape[0])
            got = {
                "none": ops._linear_pointwise(x, packed, b, "none", [], ""),
                "relu": ops._linear_pointwise(x, packed, b, "relu", [], ""),
                "gelu": ops._linear_pointwise(x, packed, b, "gelu", [], "none"),
                "swish": ops._linear_pointwise(x, packed, b, "swish", [], ""),
                "add": ops._linear_pointwise.binary(x, r, packed, b, "add"),
            }
        y = F.linear(x.float(), w.float(), b.float())
        expected = {"none": y, "relu": F.relu(y), "gelu": F.gelu(y), "swish": F.silu(y), "add": y + r.float()}
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        return all(torch.allclose(got[k].float(), expected[k], rtol=tolerance, atol=tolerance) for k in got)
    except (AttributeError, RuntimeError, TypeError):
        return False


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if not ENABLED or x.dtype not in ONEDNN_DTYPES or weight.dtype != x.dtype:
        return False
    if bias is not None and bias.dtype != x.dtype:
        return False
    if x.dtype == torch.float32 and x.numel() * weight.shape[0] < MIN_FLOAT32_MACS:
        return False
    return onednn_usable(x.dtype)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """activation(x @ weight^T + bias) + residual; activation None or "gelu" (the exact, erf one).

    weight: (out, in) as in nn.Linear; x: (..., in); residual: x's shape with `out` last. A residual
    and an activation together are not fused here (the residual comes after the activation)."""
    if activation not in (None,) + ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {ACTIVATIONS}")
    if activation is not None and residual is not None:
        return linear(x, weight, bias, activation) + residual
    if x.dtype != weight.dtype and x.is_floating_point():
        # A layer whose weights are in another dtype than its input (the fast mode's decoder: float32
        # tokens through its bfloat16 MLPs, its bfloat16 image side through a float32 projection):
        # the product runs in the layer's dtype, the result comes back in the input's.
        y = linear(x.to(weight.dtype), weight, bias, activation).to(x.dtype)
        return y if residual is None else residual + y
    small = _small_bfloat16_product(x, weight, bias)
    if small or not _use_onednn(x, weight, bias):
        y = _small_bfloat16_linear(x, weight, bias) if small else F.linear(x, weight, bias)
        if activation == "gelu":
            y = F.gelu(y)
        return y if residual is None else residual + y
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()  # oneDNN would repack it on every call, slowly
    if (
        residual is not None
        and residual.shape == x.shape[:-1] + weight.shape[:1]
        and residual.dtype == x.dtype
        and residual.is_contiguous()
    ):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if activation == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return y if residual is None else residual + y


def plain_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """linear() through F.linear alone: what an engine built for a device other than a CPU binds."""
    if activation not in (None,) + ACTIVATIONS:
        raise ValueError(f"unsupported activation {activation!r}; expected one of {ACTIVATIONS}")
    if x.dtype != weight.dtype and x.is_floating_point():
        y = plain_linear(x.to(weight.dtype), weight, bias, activation).to(x.dtype)
        return y if residual is None else residual + y
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    return y if residual is None else residual + y


def _small_bfloat16_product(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    return (
        x.dtype is torch.bfloat16
        and ENABLED
        and weight.dtype is torch.bfloat16
        and isinstance(weight, nn.Parameter)
        and weight.numel() <= SMALL_WEIGHT
        and (bias is None or bias.dtype is torch.bfloat16)
        and x.numel() < SMALL_BFLOAT16_ROWS * x.shape[-1]
    )


def _small_bfloat16_linear(x: torch.Tensor, weight: nn.Parameter, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear for bfloat16 x of a few rows (the decoder's tokens) and a small layer, in float32.

    bfloat16 values are exact in float32 and a bfloat16 product accumulates in float32 anyway: the same
    arithmetic up to the order of the sums, the result rounded to bfloat16 as before. For a few rows
    and weights that stay in cache the float32 kernel is quicker here (the bfloat16 one pays for
    packing its operands). The float32 copies are kept on the weight tensors until they change."""
    w32 = float32_copy(weight)
    b32 = None if bias is None else float32_copy(bias)
    return F.linear(x.float(), w32, b32).to(torch.bfloat16)


def float32_copy(t: torch.Tensor) -> torch.Tensor:
    """t in float32, kept on t until it changes (for a small layer's bfloat16 weights)."""
    return kept_until_changed(t, "_segany_float32", [t], lambda: t.detach().float())


def matmul_weight(x: torch.Tensor, weight: torch.Tensor, arrange: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x @ arrange(weight), where arrange views a layer's weight as the other operand (per head, say);
    for a few bfloat16 rows and a small layer computed in float32 (see float32_weight_for)."""
    w32 = float32_weight_for(x, weight)
    if w32 is None:
        return x @ arrange(weight)
    return (x.float() @ arrange(w32)).to(x.dtype)


def plain_matmul_weight(x: torch.Tensor, weight: torch.Tensor, arrange: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x @ arrange(weight) as it is (an engine built for a device other than a CPU)."""
    return x @ arrange(weight)


def no_float32_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    """float32_weight_for where the products run as they are (a device other than a CPU)."""
    return None


def float32_weight_for(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """For the other products of a few bfloat16 rows x with a small layer's weight (per-head views of
    it: the decoder's attention folded into its tokens), a float32 copy of the weight to compute them
    with (x.float(), the result rounded back to bfloat16), as _small_bfloat16_linear does and for the
    same reason (a bfloat16 batched product of a few rows ran 2-3x slower here); None where the
    product should run as it is (float32, larger operands)."""
    if _small_bfloat16_product(x, weight, None):
        return float32_copy(weight)
    return None


def fusable_activation(act: nn.Module) -> Optional[str]:
    """The `activation` name under which linear() applies `act` itself, or None when it cannot."""
    return "gelu" if type(act) is nn.GELU and act.approximate == "none" else None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) whose inference products go through the
    engine's bound product (linear on a CPU, plain_linear elsewhere)."""

    paths = UNBOUND

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.paths.linear(x, self.weight, self.bias)


register(nn.Linear, Linear)
