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


def rows_attention_in_float64(qkv, pad, index, heads, layout, scale, bias=None, rel_pos=None):
    """The released formulas in float64 from the same values: each window's q, k, v gathered from the
    rows (padding from `pad`), SAM's (q * scale) k^T + decomposed rel-pos bias (q scaled in the inputs'
    dtype first, as released) or TinyViT's (q k^T) * scale + bias, softmax, times v, scattered back to the
    rows (padding dropped)."""
    from segany.modeling.image_encoder import decomposed_rel_pos_bias

    d = qkv.shape[1] // (3 * heads)
    rows = torch.cat([qkv, pad[None]])  # row -1: the padding's qkv
    out = torch.zeros(qkv.shape[0], heads * d, dtype=torch.float64)
    for window in index:
        x = rows[window]
        def part(offset):
            return torch.stack([x[:, offset + h * layout.head : offset + h * layout.head + d] for h in range(heads)])
        q, k, v = part(layout.q), part(layout.k), part(layout.v)  # heads, n, d
        if rel_pos is not None:
            rel_pos_h, rel_pos_w, size = rel_pos
            logits = (q * scale).double() @ k.double().transpose(1, 2)
            logits = logits + decomposed_rel_pos_bias(q.double(), rel_pos_h.double(), rel_pos_w.double(), size, size)
        elif bias is not None:
            logits = (q.double() @ k.double().transpose(1, 2)) * scale + bias.double()
        else:
            logits = (q * scale).double() @ k.double().transpose(1, 2)
        mixed = logits.softmax(-1) @ v.double()  # heads, n, d
        inside = window >= 0
        out[window[inside]] = mixed.transpose(0, 1).reshape(len(window), -1)[inside]
    return out


def _rows_case(dtype, b, h, w, window, heads, d, seed):
    generator = torch.Generator().manual_seed(seed)
    index = ie.window_index(b, h, w, window, torch.device("cpu")) if window else torch.arange(b * h * w).view(b, h * w)
    qkv = torch.randn(b * h * w, heads * 3 * d, generator=generator).to(dtype)
    pad = torch.randn(heads * 3 * d, generator=generator).to(dtype)
    return index, qkv, pad, generator


def _close(out, expected, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)
    else:  # within bfloat16 rounding of the probabilities and the output
        assert ((out.double() - expected).norm() / expected.norm()).item() < 5e-3


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "b,h,w,window,heads,d",
    [(1, 20, 17, 14, 3, 64), (2, 9, 13, 7, 2, 80), (1, 5, 7, 0, 4, 16), (2, 1, 1, 0, 2, 64), (1, 33, 2, 0, 1, 32), (1, 32, 64, 0, 2, 64)],
)
def test_sam_rows_kernel_against_float64(dtype, b, h, w, window, heads, d):
    """SAM's attention with its decomposed rel-pos bias through attention_rows against the formula in
    float64: windows that run into the padding (window > 0; their q, k, v the qkv bias), global blocks
    (window 0: one window per image), odd grids, key counts that are not a multiple of 16 or 2, head
    sizes 16-80 (ViT-H's 80), and a grid whose rows are whole blocks of 32 keys (the bias added as the
    logits are stored). bfloat16: ~0.2% relative L2 (its logits are never rounded to bfloat16);
    float32: to float32 rounding; padded rows of out untouched."""
    index, qkv, pad, generator = _rows_case(dtype, b, h, w, window, heads, d, seed=d + h)
    size = (window, window) if window else (h, w)
    tables = tuple((torch.randn(2 * s - 1, d, generator=generator) * 0.3).to(dtype) for s in size)
    layout = rps.QkvLayout.sam(heads, d)
    for rel_pos in ((*tables, size), None):  # with SAM's rel-pos bias, and without any (use_rel_pos=False)
        out = torch.full((b * h * w, heads * d), 7.0, dtype=dtype)
        assert rps.attention_rows(rps.library(), qkv, pad, index, heads, layout, d**-0.5, out, rel_pos=rel_pos)
        _close(out, rows_attention_in_float64(qkv, pad, index, heads, layout, d**-0.5, rel_pos=rel_pos), dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h,w,window,heads,d", [(9, 11, 7, 4, 32), (14, 14, 7, 5, 32), (5, 3, 14, 2, 16), (7, 7, 7, 1, 64), (10, 4, 3, 3, 80)])
def test_tiny_vit_rows_kernel_against_float64(dtype, h, w, window, heads, d):
    """TinyViT's windowed attention (per-head q, k, v; learned bias of every query/key pair, added to the
    scaled product) through attention_rows against the formula in float64, two images."""
    index, qkv, pad, generator = _rows_case(dtype, 2, h, w, window, heads, d, seed=h * 31 + w + d)
    bias = torch.randn(heads, window * window, window * window, generator=generator) * 2
    out = torch.full((2 * h * w, heads * d), 7.0, dtype=dtype)
    layout = rps.QkvLayout.tiny_vit(heads, d)
    assert rps.attention_rows(rps.library(), qkv, pad, index, heads, layout, d**-0.5, out, bias=bias)
    _close(out, rows_attention_in_float64(qkv, pad, index, heads, layout, d**-0.5, bias=bias), dtype)


def test_window_index_covers_every_position_once():
    index = ie.window_index(3, 10, 13, 4, torch.device("cpu"))
    assert index.shape == (3 * 3 * 4, 16)
    inside = index[index >= 0]
    assert torch.equal(inside.sort().values, torch.arange(3 * 10 * 13))
    # window (image 0, row 1 of windows, column 2): rows 4..7, columns 8..11 of image 0
    assert index[1 * 4 + 2].tolist()[:4] == [4 * 13 + 8, 4 * 13 + 9, 4 * 13 + 10, 4 * 13 + 11]
    assert (index[4 * 3 - 1] == -1).sum() == 16 - 2 * 1  # the last window of image 0: rows 8-9, column 12 only


def test_rows_kernel_declines_what_it_cannot_run():
    """float64, mixed dtypes, head sizes it has no tiles for, mismatched widths, a grid that is not the
    window's positions, both biases at once: False, out untouched (the caller keeps its PyTorch path)."""
    index = torch.zeros(1, 4, dtype=torch.int64)
    sam, tiny = rps.QkvLayout.sam(2, 32), rps.QkvLayout.tiny_vit(2, 32)
    tables = torch.randn(3, 32), torch.randn(3, 32)
    good = torch.randn(4, 2 * 3 * 32), torch.randn(2 * 3 * 32)
    cases = [
        (good[0].double(), good[1].double(), torch.zeros(4, 64).double(), {}),
        (*good, torch.zeros(4, 64).bfloat16(), {}),
        (torch.randn(4, 2 * 3 * 24).bfloat16(), torch.randn(2 * 3 * 24).bfloat16(), torch.zeros(4, 48).bfloat16(), {}),
        (*good, torch.zeros(4, 32), {}),
        (*good, torch.zeros(4, 64), {"rel_pos": (*tables, (2, 3))}),
        (*good, torch.zeros(4, 64), {"rel_pos": (*tables, (2, 2)), "bias": torch.zeros(2, 4, 4)}),
        (*good, torch.zeros(4, 64), {"bias": torch.zeros(2, 4, 5)}),
    ]
    for qkv, pad, out, extra in cases:
        before = out.clone()
        assert not rps.attention_rows(rps.library(), qkv, pad, index, 2, sam, 0.1, out, **extra)
        assert torch.equal(out, before)
    assert rps.QkvLayout.tiny_vit(2, 32) == tiny
