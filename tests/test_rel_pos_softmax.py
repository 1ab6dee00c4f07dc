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
    assert rps.rel_pos_softmax_(got, rel_h, rel_w)
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
    assert rps.rel_pos_softmax_(got, rel_h, rel_w)
    torch.testing.assert_close(got, pytorch_softmax(logits, rel_h, rel_w), atol=1e-7, rtol=1e-6)


def test_declines_what_it_cannot_run():
    """Other dtypes, a shape that is not k_h x k_w keys, non-contiguous rows, tensors needing gradients:
    False and the logits unchanged (the caller keeps its PyTorch path)."""
    rel_h, rel_w = torch.randn(4, 3, 1), torch.randn(4, 1, 5)
    cases = [
        torch.randn(4, 15, dtype=torch.float64),
        torch.randn(4, 16),
        torch.randn(15, 4).t(),
        torch.randn(4, 15, requires_grad=True),
    ]
    for logits in cases:
        before = logits.detach().clone()
        assert not rps.rel_pos_softmax_(logits, rel_h, rel_w)
        assert torch.equal(logits.detach(), before)
    assert not rps.rel_pos_softmax_(torch.randn(4, 15), rel_h.half(), rel_w.half())


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
        got = ie.rel_pos_attention_chunked(q, k, v, rel_pos_h, rel_pos_w, q_size, c**-0.5)
        monkeypatch.setattr(ie, "rel_pos_softmax_", lambda *a: False)
        expected = ie.rel_pos_attention_chunked(q, k, v, rel_pos_h, rel_pos_w, q_size, c**-0.5)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    else:
        assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 2e-3
