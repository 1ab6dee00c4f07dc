"""segany.engine.kernels (oneDNN linear layers at inference) and the encoder's windowed inference path."""
import pytest
import torch
import torch.nn.functional as F

from segany.engine import kernels
from segany.engine.common import MLPBlock

from segany.engine.twin import twin
from segany.modeling.image_encoder import Block, window_partition, window_unpartition


def _close(got, expected, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = expected.float().abs().max().item() + 1e-6
    assert (got.float() - expected.float()).abs().max().item() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 200])
def test_linear_matches_f_linear(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 48, generator=g).to(dtype)
    w = torch.randn(40, 48, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    res = torch.randn(2, rows, 40, generator=g).to(dtype)
    expected = F.linear(x.float(), w.float(), b.float())
    with torch.inference_mode():
        _close(kernels.linear(x, w, b), expected, dtype)
        _close(kernels.linear(x, w), expected - b.float(), dtype)
        _close(kernels.linear(x, w, b, activation="gelu"), F.gelu(expected), dtype)
        _close(kernels.linear(x, w, b, residual=res), expected + res.float(), dtype)
        _close(kernels.linear(x, w, b, activation="gelu", residual=res), F.gelu(expected) + res.float(), dtype)
        # weights laid out in any order: a transposed view, and one that is neither
        _close(kernels.linear(x, w.t().contiguous().t(), b), expected, dtype)
        wide = torch.randn(40, 96, generator=g).to(dtype)
        wide[:, ::2] = w
        _close(kernels.linear(x, wide[:, ::2], b), expected, dtype)
        _close(kernels.linear(x.transpose(0, 1), w, b), expected.transpose(0, 1), dtype)


def test_linear_differentiable_and_switchable():
    x = torch.randn(300, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    kernels.linear(x, w, activation="gelu").sum().backward()  # a tiny float32 product: F.linear
    assert x.grad is not None and w.grad is not None
    with pytest.raises(ValueError, match="unsupported activation"):
        kernels.linear(x, w, activation="relu")
    before = kernels.ENABLED
    try:
        with torch.inference_mode():
            on = kernels.linear(x.detach(), w.detach())
            kernels.ENABLED = False
            off = kernels.linear(x.detach(), w.detach())
    finally:
        kernels.ENABLED = before
    _close(on, off, torch.float32)


@pytest.mark.parametrize("with_residual", [False, True])
def test_mlp_block_chunks_match_plain(with_residual):
    torch.manual_seed(0)
    mlp = MLPBlock(32, 64)
    mlp.CHUNK_ROWS = 16  # chunked path for 50 rows (> 2 chunks)
    x = torch.randn(1, 5, 10, 32)
    res = torch.randn(1, 5, 10, 32) if with_residual else None
    expected = mlp.lin2(F.gelu(mlp.lin1(x))).detach()
    if with_residual:
        expected = expected + res
    with torch.inference_mode():
        got = mlp(x, residual=res)
    _close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "h,w,ws,qkv_bias,rel_pos",
    [(64, 64, 14, True, True), (20, 33, 7, True, True), (14, 28, 14, False, True), (9, 5, 4, True, False), (3, 3, 14, True, True)],
)
def test_windowed_attention_inference_path_matches_released_order(dtype, h, w, ws, qkv_bias, rel_pos):
    """mix_windowed (projection on unpadded positions, merged copies) == partition -> attention -> unpartition."""
    torch.manual_seed(h * 100 + w)
    plain = Block(64, 4, window_size=ws, use_rel_pos=rel_pos, qkv_bias=qkv_bias, input_size=(h, w)).eval()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.3)
    plain.to(dtype)
    block = twin(plain)
    x = torch.randn(2, h, w, 64).to(dtype)
    with torch.inference_mode():
        normed = block.norm1(x)
        windows, pad_hw = window_partition(normed, ws)
        expected = window_unpartition(block.attn.mix(windows), ws, pad_hw, (h, w))
        got = block.attn.mix_windowed(normed, ws)
    assert got.shape == expected.shape and got.is_contiguous()
    _close(got, expected, dtype)
    # the whole block: the engine's path against the plain definition's (released order)
    with torch.inference_mode():
        fast = block(x)
        slow = plain(x)
    _close(fast, slow, dtype)


def test_small_bfloat16_layers_run_in_float32_and_follow_weight_changes():
    """A few bfloat16 rows through a small layer: a float32 product of the same values (kept float32
    weights), rounded to bfloat16; an in-place change of the weights is seen on the next call."""
    torch.manual_seed(0)
    layer = kernels.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(1, 7, 64).to(torch.bfloat16)
    with torch.inference_mode():
        got = layer(x)
        assert got.dtype == torch.bfloat16
        expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert torch.equal(got, expected.to(torch.bfloat16))
        before = got.clone()
    with torch.no_grad():
        layer.weight.mul_(2)
    with torch.inference_mode():
        changed = layer(x)
    assert not torch.equal(changed, before)
    _close(changed, F.linear(x.float(), layer.weight.float(), layer.bias.float()), torch.bfloat16)


@pytest.mark.parametrize("rows", [7, 300])
def test_linear_with_weights_in_another_dtype_computes_in_theirs_and_returns_the_inputs(rows):
    """float32 tokens through a bfloat16 layer (the fast decoder's MLPs) and a bfloat16 image side
    through a float32 layer: the product in the layer's dtype, the result in the input's; the MLP
    block casts once around both of its layers."""
    torch.manual_seed(0)
    layer = kernels.Linear(64, 48).to(torch.bfloat16)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        got = layer(x)
        assert got.dtype == torch.float32
        assert torch.allclose(got, F.linear(x.bfloat16(), layer.weight, layer.bias).float(), rtol=1e-2, atol=1e-2)
        layer32 = kernels.Linear(64, 48)
        got = layer32(x.bfloat16())
        assert got.dtype == torch.bfloat16
        _close(got, F.linear(x.bfloat16().float(), layer32.weight, layer32.bias), torch.bfloat16)
        block = MLPBlock(64, 256, torch.nn.ReLU).to(torch.bfloat16)
        out = block(x)
        assert out.dtype == torch.float32
        expected = block.lin2(torch.relu(block.lin1(x.bfloat16()))).float()
        assert torch.equal(out, expected)
