"""segany.engine.native: the compiled CPU kernels (csrc/) against PyTorch's operations, the
fallback where they cannot be built, and the build cache."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segany.engine import native
from segany.modeling.common import LayerNorm2d
from segany.engine.mask_decoder import MaskUpscaling

needs_kernels = pytest.mark.skipif(
    native.library() is None,
    reason="segany's native kernels are not available here (no AVX-512 BF16 CPU, no C compiler, or SEGANY_NATIVE=0)",
)


def upscaling(dim: int = 256, seed: int = 0) -> MaskUpscaling:
    torch.manual_seed(seed)
    module = MaskUpscaling(
        nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
        nn.GELU(),
    )
    with torch.no_grad():  # a norm that is not the identity, weights large enough for varied logits
        module[1].weight.uniform_(0.5, 1.5)
        module[1].bias.uniform_(-0.5, 0.5)
        module[0].weight.mul_(3.0)
        module[3].weight.mul_(3.0)
    return module.eval()


def float32_logits(module: MaskUpscaling, x: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
    """The released computation in float64 from the same (bfloat16) weights and inputs: forward() of
    the NCHW features, then each mask's dot product with them."""
    up1, norm, act1, up2, act2 = copy.deepcopy(module).double()
    feats = up1(x.double().permute(0, 3, 1, 2))
    u = feats.mean(1, keepdim=True)
    s = (feats - u).pow(2).mean(1, keepdim=True)
    feats = (feats - u) / torch.sqrt(s + norm.eps)
    feats = F.gelu(norm.weight[:, None, None] * feats + norm.bias[:, None, None])
    feats = F.gelu(up2(feats))
    return torch.einsum("btc,bchw->bthw", hyper.double(), feats)


def rel_l2(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


@needs_kernels
def test_gelu_matches_float64():
    x = torch.linspace(-12.0, 12.0, 1 << 16)
    y = torch.empty_like(x)
    native.library().segany_gelu_f32(x.data_ptr(), y.data_ptr(), x.numel())
    err = (y.double() - F.gelu(x.double())).abs().max().item()
    assert err < 2e-6, err  # PyTorch's own float32 GELU: 1.3e-6


@needs_kernels
@pytest.mark.parametrize("shape,tokens", [((1, 16, 16), 3), ((2, 5, 7), 1), ((1, 9, 12), 4)])
def test_native_upscaling_matches_the_float_chain(shape, tokens):
    """Logits of the kernel against the float64 chain of the same bfloat16 weights and inputs, and
    against the PyTorch bfloat16 path it replaces; odd sizes leave a short last tile."""
    module = upscaling().to(torch.bfloat16)
    g = torch.Generator().manual_seed(sum(shape) + tokens)
    x = torch.randn(*shape, 256, generator=g).to(torch.bfloat16)
    hyper = torch.randn(shape[0], tokens, 32, generator=g)
    expected = float32_logits(module, x, hyper)
    with torch.inference_mode():
        assert module._native_weights() is not None
        got = module.masks(x, hyper)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        native_error = rel_l2(got, expected)
        assert native_error < 5e-3, native_error  # (measured 1.6e-3: only the second product's input is rounded)
        original = native.library
        try:
            native.library = lambda: None  # the PyTorch path on the same module
            banded = module.masks(x, hyper)
        finally:
            native.library = original
    assert rel_l2(banded, expected) < 1.5e-2
    assert native_error < rel_l2(banded, expected)


@needs_kernels
def test_native_upscaling_region_and_batch():
    """region: the top-left block of each prompt's logits equals the full call's, zeros elsewhere; each
    prompt of a batch equals its own call."""
    module = upscaling(seed=1).to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 10, 256, generator=g).to(torch.bfloat16)
    hyper = torch.randn(2, 3, 32, generator=g)
    with torch.inference_mode():
        full = module.masks(x, hyper)
        part = module.masks(x, hyper, region=(7, 5))
        single = module.masks(x[1:], hyper[1:])
    assert torch.equal(part[..., :28, :20], full[..., :28, :20])
    assert not part[..., 28:, :].any() and not part[..., :, 20:].any()
    assert torch.equal(single[0], full[1])


def test_other_structures_and_dtypes_keep_the_pytorch_path():
    """float32 (the exact mode), another decoder width or another activation never reach the kernel."""
    with torch.inference_mode():
        assert upscaling(dim=64).to(torch.bfloat16)._native_weights() is None
        relu = upscaling()
        relu[2] = nn.ReLU()
        assert relu.to(torch.bfloat16)._native_weights() is None
    assert not upscaling().native_upscaling  # float32: chosen without the kernel
    assert upscaling().to(torch.bfloat16).native_upscaling == (native.library() is not None)


def test_switched_off_or_unbuildable_falls_back(monkeypatch, tmp_path, caplog):
    """SEGANY_NATIVE=0 or a compiler that fails: library() is None (with a log line for the failure),
    and the upscaling still computes its logits through PyTorch."""
    native.library.cache_clear()
    try:
        monkeypatch.setenv("SEGANY_NATIVE", "0")
        assert native.library() is None
        native.library.cache_clear()
        monkeypatch.delenv("SEGANY_NATIVE")
        monkeypatch.setenv("SEGANY_NATIVE_CACHE", str(tmp_path))
        monkeypatch.setattr(native, "cpu_has_avx512_bf16", lambda: True)
        false = tmp_path / "broken-cc"
        false.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
        false.chmod(0o755)
        monkeypatch.setenv("CC", str(false))
        with caplog.at_level(logging.WARNING, logger=native.__name__):
            assert native.library() is None
        assert "unavailable" in caplog.text
        assert not list(tmp_path.glob("*.so"))  # nothing half-written left under the cache
        module = upscaling().to(torch.bfloat16)
        x = torch.randn(1, 4, 4, 256).to(torch.bfloat16)
        hyper = torch.randn(1, 3, 32)
        with torch.inference_mode():
            got = module.masks(x, hyper)
        assert rel_l2(got, float32_logits(module, x, hyper)) < 1.5e-2
    finally:
        native.library.cache_clear()


@needs_kernels
def test_build_is_cached(monkeypatch, tmp_path):
    """The library is compiled once per source, flags and compiler, then loaded from the cache."""
    monkeypatch.setenv("SEGANY_NATIVE_CACHE", str(tmp_path))
    compiler = native._compiler()
    first = native._build(compiler)
    stamp = first.stat().st_mtime_ns
    assert native._build(compiler) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def _decode(model, features, coords, labels, cache):
    from segany.engine import SamEngine

    with torch.inference_mode():
        low, iou = SamEngine(model).decode(features, (coords, labels), None, None, True, cache=cache)
    return low.double(), iou.double()


@needs_kernels
@pytest.mark.parametrize("n_points", [1, 4, 26, 27])
def test_native_image_update_in_the_decoder(tiny_sam, monkeypatch, n_points):
    """A fast decode with the compiled image update (both two-way blocks: 7, 10 and 32 tokens; 33
    tokens (27 points) are past the kernel's limit and keep PyTorch's path) against the exact (float32) decode,
    and against the fast decode through PyTorch's operations: closer to float32, never further."""
    from segany.engine import transformer
    from segany.engine import make_fast

    fast = make_fast(copy.deepcopy(tiny_sam))
    g = torch.Generator().manual_seed(n_points)
    features = {"image_embeddings": torch.randn(1, 256, 64, 64, generator=g)}
    coords = torch.rand(1, n_points, 2, generator=g) * 1000
    labels = torch.randint(0, 2, (1, n_points), generator=g)
    calls = []
    real_update = transformer.Attention.native_image_update

    def counting(self, *args, **kwargs):
        result = real_update(self, *args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(transformer.Attention, "native_image_update", counting)
    expected, expected_iou = _decode(tiny_sam, features, coords, labels, cache={})
    got, got_iou = _decode(fast, features, coords, labels, cache={})
    assert calls == [n_points + 6 <= 32] * 2  # both blocks, where the tokens (5 outputs, points, pad) fit
    monkeypatch.setattr(transformer, "native_image_update_usable", lambda *a: False)
    calls.clear()
    plain, _ = _decode(fast, features, coords, labels, cache={})
    assert not calls
    error = rel_l2(got, expected)
    assert error < 2e-2, error
    assert error <= rel_l2(plain, expected) * 1.05
    assert (got_iou - expected_iou).abs().max().item() < 5e-2


def test_native_resize_declines_what_it_cannot_do(monkeypatch):
    """An image so narrow that 16 output columns read more than 16 low-res ones, or no kernels: None
    (the caller resizes with OpenCV)."""
    from segany.predict.transforms import upscale_logits_native

    low = torch.randn(1, 3, 256, 256)
    if native.library() is not None:
        assert upscale_logits_native(low, (1024, 1024), (60, 60), 1024) is None
    monkeypatch.setattr(native, "library", lambda: None)
    assert upscale_logits_native(low, (576, 1024), (480, 854), 1024) is None
