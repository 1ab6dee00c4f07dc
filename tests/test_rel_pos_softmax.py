"""segany.engine.rel_pos_softmax: the one-pass rel-pos bias + softmax kernel against PyTorch's passes,
the attention paths with and without it, and where it declines."""
from __future__ import annotations

import pytest
import torch

from segany.engine import image_encoder as ie
from segany.engine import rel_pos_softmax as rps

needs_kernel = pytest.mark.skipif(
    rps.library() is None,
    reason="segany's attention kernel is not available here (no AVX-512 BF16 CPU, no C compiler, or SEGANY_NATIVE=0)",
)


def pytorch_softmax(logits, rel_h, rel_w):
    """The passes the kernel replaces: float32 logits, the two broadcast adds, softmax, back to the dtype."""
    x = logits.float().clone()
    x.view(*x.shape[:-1], rel_h.shape[-2], rel_w.shape[-1]).add_(rel_h).add_(rel_w)
    return x.softmax(-1).to(logits.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,k_h,k_w", [((3, 196), 14, 14), ((2, 64), 8, 8), ((41,), 5, 3), ((1, 17), 16, 33), ((2,), 1, 1)])
def test_kernel_matches_pytorch(dtype, batch, k_h, k_w):
    generator = torch.Generator().manual_seed(k_h * 100 + k_w)
    logits = (torch.randn(*batch, k_h * k_w, generator=generator) * 6).to(dtype)
    rel_h = torch.randn(*batch, k_h, 1, generator=generator) * 3
    rel_w = torch.randn(*batch, 1, k_w, generator=generator) * 3
    expected = pytorch_softmax(logits, rel_h, rel_w)
    got = logits.clone()
    assert rps.rel_pos_softmax_(rps.library(), got, rel_h, rel_w)
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    else:  # the same float32 values rounded to bfloat16: equal but for the rare value next to a tie
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-7, rtol=8e-3)
        assert (got != expected).float().mean() < 1e-3
    torch.testing.assert_close(got.float().sum(-1), torch.ones(batch), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)


@needs_kernel
def test_kernel_keeps_large_logits_finite():
    """A row whose logits and bias are large (a peaked softmax) still sums to one, with no overflow."""
    logits = torch.tensor([[80.0, -90.0, 1e4, 3.0]])
    rel_h = torch.tensor([[[5.0], [-5.0]]])
    rel_w = torch.tensor([[[0.0, 40.0]]])
    got = logits.clone()
    assert rps.rel_pos_softmax_(rps.library(), got, rel_h, rel_w)
    torch.testing.assert_close(got, pytorch_softmax(logits, rel_h, rel_w), atol=1e-7, rtol=1e-6)


def test_declines_what_it_cannot_run():
    """Other dtypes, a shape that is not k_h x k_w keys, non-contiguous rows: False and the logits unchanged (the caller keeps its PyTorch path)."""
    rel_h, rel_w = torch.randn(4, 3, 1), torch.randn(4, 1, 5)
    cases = [
        torch.randn(4, 15, dtype=torch.float64),
        torch.randn(4, 16),
        torch.randn(15, 4).t(),
    ]
    for logits in cases:
        before = logits.detach().clone()
        assert not rps.rel_pos_softmax_(rps.library(), logits, rel_h, rel_w)
        assert torch.equal(logits.detach(), before)
    assert not rps.rel_pos_softmax_(rps.library(), torch.randn(4, 15), rel_h.half(), rel_w.half())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_size,global_rows", [((14, 14), 1024), ((9, 13), 50)])
def test_attention_paths_equal_with_and_without_the_kernel(dtype, q_size, global_rows, monkeypatch):
    """rel_pos_attention_chunked (windowed, and banded where global_rows is small) gives what its
    PyTorch path gives: float32 to rounding, bfloat16 to a bfloat16 step here and there."""
    monkeypatch.setattr(ie, "GLOBAL_ROWS", global_rows)
    monkeypatch.setattr(ie, "BAND_ROWS", 40)
    torch.manual_seed(2)
    n, c = q_size[0] * q_size[1], 16
    q, k, v = (torch.randn(6, n, c).to(dtype) for _ in range(3))
    rel_pos_h, rel_pos_w = (torch.randn(2 * s - 1, c).to(dtype) for s in q_size)
    with torch.inference_mode():
        got = ie.rel_pos_attention_chunked(q, k, v, rel_pos_h, rel_pos_w, q_size, c**-0.5, kernels=rps.library())
        expected = ie.rel_pos_attention_chunked(q, k, v, rel_pos_h, rel_pos_w, q_size, c**-0.5)  # PyTorch only
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    else:  # the fused kernel's logits are not rounded to bfloat16: close, not equal
        assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 1.5e-2


def attention_in_float64(q, k, v, rel_pos_h, rel_pos_w, q_size, scale):
    """The released formula from the same bfloat16 values, in float64 (q scaled in bfloat16 first)."""
    from segany.modeling.image_encoder import decomposed_rel_pos_bias

    bias = decomposed_rel_pos_bias(q.double(), rel_pos_h.double(), rel_pos_w.double(), q_size, q_size)
    logits = (q * scale).double() @ k.double().transpose(1, 2) + bias
    return logits.softmax(-1) @ v.double()


@needs_kernel
@pytest.mark.parametrize(
    "q_size,bh,d", [((14, 14), 7, 64), ((9, 13), 3, 80), ((5, 7), 4, 16), ((1, 1), 2, 64), ((33, 2), 1, 32), ((32, 64), 2, 64)]
)
def test_fused_attention_kernel_against_float64(q_size, bh, d):
    """rel_pos_attention_native against the formula in float64: within bfloat16 rounding of the
    probabilities and the output (~0.2% relative L2, better than the PyTorch path whose logits are
    rounded to bfloat16 too), on odd grids, key counts that are not a multiple of 16 or 2, head sizes
    64 and 80 (ViT-H), and a grid whose rows are whole blocks of 32 keys (the bias added at store)."""
    generator = torch.Generator().manual_seed(d + q_size[0])
    n = q_size[0] * q_size[1]
    q, k, v = (torch.randn(bh, n, d, generator=generator).bfloat16() for _ in range(3))
    tables = [(torch.randn(2 * s - 1, d, generator=generator) * 0.3).bfloat16() for s in q_size]
    got = rps.rel_pos_attention_native(rps.library(), q, k, v, *tables, q_size, d**-0.5)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    expected = attention_in_float64(q, k, v, *tables, q_size, d**-0.5)
    assert ((got.double() - expected).norm() / expected.norm()).item() < 5e-3


def test_fused_attention_declines_what_it_cannot_run():
    """float32 (exact mode), head sizes it has no tiles for, a grid that is not N positions."""
    tables = torch.randn(5, 64), torch.randn(7, 64)
    q = torch.randn(2, 12, 64)
    assert rps.rel_pos_attention_native(rps.library(), q, q, q, *tables, (3, 4), 0.1) is None
    odd = torch.randn(2, 12, 24).bfloat16()
    assert rps.rel_pos_attention_native(rps.library(), odd, odd, odd, torch.randn(5, 24), torch.randn(7, 24), (3, 4), 0.1) is None
    b = q.bfloat16()
    assert rps.rel_pos_attention_native(rps.library(), b, b, b, *tables, (3, 5), 0.1) is None


def window_attention_in_float64(qkv, pad, index, bias, scale):
    """TinyViT's windowed attention by the formula: each window's q, k, v gathered from the rows (padding
    from `pad`), softmax((q k^T) * scale + bias) v, scattered back to the rows (padding dropped)."""
    heads = bias.shape[0]
    d = qkv.shape[1] // (3 * heads)
    rows = torch.cat([qkv.double(), pad.double()[None]])  # row -1: the padding's qkv
    out = torch.zeros(qkv.shape[0], heads * d, dtype=torch.float64)
    for window in index:
        x = rows[window].view(len(window), heads, 3, d).permute(2, 1, 0, 3)  # 3, heads, n, d
        q, k, v = x.unbind(0)
        mixed = ((q @ k.transpose(1, 2)) * scale + bias.double()).softmax(-1) @ v  # heads, n, d
        inside = window >= 0
        out[window[inside]] = mixed.transpose(0, 1).reshape(len(window), -1)[inside]
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h,w,window,heads,d", [(9, 11, 7, 4, 32), (14, 14, 7, 5, 32), (5, 3, 14, 2, 16), (7, 7, 7, 1, 64), (10, 4, 3, 3, 80)])
def test_window_attention_kernel_against_float64(dtype, h, w, window, heads, d):
    """window_attention_native against the formula in float64, with windows that run into the padding
    (whose q, k, v are a constant row), key counts that are not a multiple of 16 or 2, two images, every
    head size the kernel takes: within bfloat16 rounding (bfloat16), float32 rounding (float32); padded
    rows of `out` are left as they were."""
    from segany.engine.tiny_vit import _window_index

    generator = torch.Generator().manual_seed(h * 31 + w + d)
    b = 2
    index = _window_index(b, h, w, window, torch.device("cpu"))
    qkv = torch.randn(b * h * w, heads * 3 * d, generator=generator).to(dtype)
    pad = torch.randn(heads * 3 * d, generator=generator).to(dtype)
    bias = torch.randn(heads, window * window, window * window, generator=generator) * 2
    out = torch.full((b * h * w, heads * d), 7.0, dtype=dtype)
    assert rps.window_attention_native(rps.library(), qkv, pad, index, bias, d**-0.5, out)
    expected = window_attention_in_float64(qkv, pad, index, bias, d**-0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    else:
        assert ((out.double() - expected).norm() / expected.norm()).item() < 5e-3


def test_window_index_covers_every_position_once():
    from segany.engine.tiny_vit import _window_index

    index = _window_index(3, 10, 13, 4, torch.device("cpu"))
    assert index.shape == (3 * 3 * 4, 16)
    inside = index[index >= 0]
    assert torch.equal(inside.sort().values, torch.arange(3 * 10 * 13))
    # window (image 0, row 1 of windows, column 2): rows 4..7, columns 8..11 of image 0
    assert index[1 * 4 + 2].tolist()[:4] == [4 * 13 + 8, 4 * 13 + 9, 4 * 13 + 10, 4 * 13 + 11]
    assert (index[4 * 3 - 1] == -1).sum() == 16 - 2 * 1  # the last window of image 0: rows 8-9, column 12 only


def test_window_attention_declines_what_it_cannot_run():
    """float64, mixed dtypes, head sizes it has no tiles for, mismatched widths: False, out untouched."""
    index = torch.zeros(1, 4, dtype=torch.int64)
    bias = torch.zeros(2, 4, 4)
    for qkv, pad, out in [
        (torch.randn(4, 2 * 3 * 32).double(), torch.randn(2 * 3 * 32).double(), torch.zeros(4, 64).double()),
        (torch.randn(4, 2 * 3 * 32), torch.randn(2 * 3 * 32), torch.zeros(4, 64).bfloat16()),
        (torch.randn(4, 2 * 3 * 24).bfloat16(), torch.randn(2 * 3 * 24).bfloat16(), torch.zeros(4, 48).bfloat16()),
        (torch.randn(4, 2 * 3 * 32).bfloat16(), torch.randn(2 * 3 * 32).bfloat16(), torch.zeros(4, 32).bfloat16()),
    ]:
        before = out.clone()
        assert not rps.window_attention_native(rps.library(), qkv, pad, index, bias, 0.1, out)
        assert torch.equal(out, before)
