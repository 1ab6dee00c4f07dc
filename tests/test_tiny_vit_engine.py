"""The engine's TinyViT (segany/engine/tiny_vit.py) against the plain definition and the released module:
folded BatchNorms, fused GELUs and residuals, windows cut in one copy, MBConv bands, MLP chunks."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import segany.engine.sam_engine  # noqa: F401  (registers the engine classes)
from segany.engine import conv as engine_conv
from segany.engine import tiny_vit as engine_tiny_vit
from segany.engine.twin import own_weights_in, twin
from segany.modeling.tiny_vit import TinyViT, TinyViTConfig

from .test_mobile_sam import _randomise, tiny_vit_of_another_size

# Windows that do not divide the grids (padding in every attention stage), odd sizes, a stride-1 merging.
CONFIG = dict(
    img_size=256, embed_dims=(8, 16, 24, 32), depths=(2, 2, 2, 1), num_heads=(1, 2, 3, 4),
    window_sizes=(7, 5, 3, 6), mlp_ratio=2.0, num_classes=0,
)


@pytest.fixture
def small_pieces(monkeypatch):
    """Every split of the engine taken on a small model: bands of a few rows, MLP and attention chunks."""
    monkeypatch.setattr(engine_tiny_vit, "BAND_ELEMENTS", 4000)
    monkeypatch.setattr(engine_tiny_vit, "MLP_CHUNK_ROWS", 200)
    monkeypatch.setattr(engine_tiny_vit, "WINDOW_CHUNK_ELEMENTS", 5000)


def _model(seed: int = 0) -> TinyViT:
    model = TinyViT(TinyViTConfig(**CONFIG)).eval()
    _randomise(model, seed)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("seed", [0])
def test_engine_tiny_vit_equals_plain_in_float32(small_pieces, seed):
    model = _model(seed)
    engine = twin(model)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected, expected_interm = model.forward_with_interm(x)
        got, got_interm = engine.forward_with_interm(x)
        whole = engine(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_interm, expected_interm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(whole, got)


def test_engine_tiny_vit_bands_and_chunks_change_nothing(monkeypatch):
    model = _model(1)
    engine = twin(model)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = engine(x)
        monkeypatch.setattr(engine_tiny_vit, "BAND_ELEMENTS", 4000)
        monkeypatch.setattr(engine_tiny_vit, "MLP_CHUNK_ROWS", 200)
        monkeypatch.setattr(engine_tiny_vit, "WINDOW_CHUNK_ELEMENTS", 5000)
        pieces = engine(x)
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)


def test_engine_tiny_vit_in_bfloat16_agrees_with_float32(small_pieces):
    model = _model(2)
    engine = twin(model)
    own_weights_in(engine, torch.bfloat16)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
        got = engine(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert _rel(got, expected) < 0.03
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_engine_tiny_vit_window_kernel_agrees_with_the_other_path(dtype, monkeypatch):
    """Head size 16 (the compiled window attention runs; vit_t's heads are 32), windows that run into the
    padding in every attention stage: float32 equals the plain model as the other path does; bfloat16
    gives the chunked PyTorch path's outputs within bfloat16 noise, both within fast mode's agreement."""
    from segany.engine import rel_pos_softmax

    if rel_pos_softmax.library() is None:
        pytest.skip("segany's attention kernels are not available here (no AVX-512 BF16 CPU, no compiler, or SEGANY_NATIVE=0)")
    config = dict(CONFIG, embed_dims=(16, 32, 48, 64))
    model = TinyViT(TinyViTConfig(**config)).eval()
    _randomise(model, 5)
    engine = twin(model)
    if dtype == torch.bfloat16:
        own_weights_in(engine, torch.bfloat16)
    attentions = [m for m in engine.modules() if isinstance(m, engine_tiny_vit.WindowAttention)]
    assert attentions and all(m.paths.attention_kernels is rel_pos_softmax.library() for m in attentions)
    calls = []
    original = engine_tiny_vit.attention_rows
    monkeypatch.setattr(engine_tiny_vit, "attention_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
        with_kernel = engine(x.to(dtype))
        assert len(calls) == len(attentions)
        for m in attentions:
            m.paths = dataclasses.replace(m.paths, attention_kernels=None)
        other = engine(x.to(dtype))
    if dtype == torch.float32:
        torch.testing.assert_close(with_kernel, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(other, expected, atol=1e-5, rtol=1e-4)
    else:
        assert _rel(with_kernel, other) < 0.01
        assert _rel(with_kernel, expected) < 0.03 and _rel(other, expected) < 0.03


def test_folded_batch_norm_follows_the_weights():
    """The folded convolutions are kept until a weight or a running statistic changes."""
    model = _model(3)
    engine = twin(model)
    plain_conv, engine_conv_bn = model.layers[0].blocks[0].conv2, engine.layers[0].blocks[0].conv2
    x = torch.randn(1, plain_conv.c.in_channels, 20, 20, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = engine_conv_bn(x)
        torch.testing.assert_close(before, plain_conv(x), atol=1e-5, rtol=1e-4)
        plain_conv.bn.running_var.mul_(4.0)
        plain_conv.bn.bias.add_(1.0)
        plain_conv.c.weight.mul_(0.5)
        expected = plain_conv(x)
        got = engine_conv_bn(x, activation="gelu")
    assert _rel(got, F.gelu(before)) > 0.1
    torch.testing.assert_close(got, F.gelu(expected), atol=1e-5, rtol=1e-4)


def test_engine_tiny_vit_takes_no_other_path_under_autograd():
    """The engine is for inference (training runs the plain modules): with autograd on it takes no
    other path; its products written into buffers refuse autograd loudly."""
    model = _model(4)
    engine = twin(model)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        inference = engine(x)
        plain = model(x)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="automatic differentiation"):
        engine(x.requires_grad_())
    torch.testing.assert_close(inference, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups,stride", [(1, 1), (6, 2), (1, 2)])
def test_fused_conv2d_equals_conv_then_operation(dtype, groups, stride):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 11, 9, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 6 // groups, 3, 3, generator=gen).to(dtype)
    b = torch.randn(12, generator=gen).to(dtype)
    plain = F.conv2d(x.float(), w.float(), b.float(), stride, 1, 1, groups)
    residual = torch.randn(plain.shape, generator=gen).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    with torch.no_grad():
        gelu = engine_conv.conv2d(x, w, b, (stride, stride), (1, 1), groups, activation="gelu")
        summed = engine_conv.conv2d(x, w, b, (stride, stride), (1, 1), groups, residual=residual)
        none = engine_conv.conv2d(x, w, None, (stride, stride), (1, 1), groups)
    torch.testing.assert_close(gelu.float(), F.gelu(plain), **tol)
    torch.testing.assert_close(summed.float(), plain + residual.float(), **tol)
    torch.testing.assert_close(none.float(), plain - b.float().view(-1, 1, 1), **tol)
    with pytest.raises(ValueError):
        engine_conv.conv2d(x, w, b, (1, 1), (1, 1), groups, activation="relu")


@pytest.mark.heavy  # a 1024-pixel input through the released module and the engine
@pytest.mark.parametrize("seed", [7])
def test_engine_tiny_vit_matches_the_released_module(small_pieces, seed):
    """The engine's TinyViT of other widths, depths, heads and windows than vit_t, against the released one."""
    encoder, x, expected = tiny_vit_of_another_size(seed)
    with torch.no_grad():
        got = twin(encoder)(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
