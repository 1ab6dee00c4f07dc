"""The training twin (segany.engine.training): the plain modules' loss and gradients, computed faster."""
from __future__ import annotations

import pytest
import torch

from segany.engine import training_twin
from segany.engine import training

# float32: the twin's products run in another order than the plain ones (folded projections, fused
# residual), so results differ by rounding. Each gradient is compared with an absolute tolerance of
# ATOL_SCALE times the largest gradient element of its module (weight and bias together): a key
# projection's bias has a zero gradient in exact arithmetic (softmax ignores a shift), and both sides
# hold rounding noise there. Measured on these cases: at most 7e-6 of the module's scale.
RTOL, ATOL_SCALE = 1e-4, 5e-5


def _cases():
    g = torch.Generator().manual_seed(3)
    one = torch.ones
    return [
        ((torch.rand(8, 1, 2, generator=g) * 1024, one(8, 1, dtype=torch.int)), None, None, True),
        ((torch.rand(3, 3, 2, generator=g) * 1024, torch.randint(0, 2, (3, 3), generator=g)), None, None, False),
        (None, torch.tensor([[100.0, 200.0, 700.0, 900.0], [10.0, 20.0, 500.0, 400.0]]), None, True),
        (
            (torch.rand(2, 2, 2, generator=g) * 1024, one(2, 2, dtype=torch.int)),
            None,
            torch.randn(2, 1, 256, 256, generator=g) * 4,
            True,
        ),
    ]


def _loss_and_grads(net, model, features, case):
    points, boxes, masks, multimask = case
    leaf = features.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    low, iou = net.decode({"image_embeddings": leaf}, points, boxes, masks, multimask)
    target = (torch.arange(low[0].numel()).view(low.shape[1:]) % 7 == 0).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(low, target.expand_as(low)) + (iou - 0.5).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["<image_embeddings>"] = leaf.grad.clone()
    return loss.detach(), low.detach(), grads


@pytest.mark.parametrize("case", range(4))
def test_training_twin_matches_the_plain_modules(tiny_sam, case):
    model = tiny_sam
    twin = training_twin(model)
    for p in model.parameters():
        p.requires_grad_(True)
    features = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(case))
    plain_loss, plain_low, plain_grads = _loss_and_grads(model, model, features, _cases()[case])
    twin_loss, twin_low, twin_grads = _loss_and_grads(twin, model, features, _cases()[case])
    torch.testing.assert_close(twin_low, plain_low, rtol=RTOL, atol=RTOL)
    torch.testing.assert_close(twin_loss, plain_loss, rtol=RTOL, atol=0)
    # The same parameters get gradients (zeros included: weight decay treats zero and None apart).
    assert set(twin_grads) == set(plain_grads)
    assert any(name.startswith("mask_decoder.transformer.") for name in twin_grads)
    scales: dict = {}
    for name, grad in plain_grads.items():
        module = name.rsplit(".", 1)[0]
        scales[module] = max(scales.get(module, 0.0), float(grad.abs().max()))
    for name, expected in plain_grads.items():
        scale = scales[name.rsplit(".", 1)[0]]
        torch.testing.assert_close(twin_grads[name], expected, rtol=RTOL, atol=ATOL_SCALE * scale, msg=name)
    model.zero_grad(set_to_none=True)


def test_training_twin_shares_the_model_and_swaps_only_the_decoder_modules(tiny_sam):
    twin = training_twin(tiny_sam)
    assert twin is not tiny_sam and type(twin) is type(tiny_sam)
    # The encoders are the model's own modules; the changed ones hold the model's parameters.
    assert twin.image_encoder is tiny_sam.image_encoder and twin.prompt_encoder is tiny_sam.prompt_encoder
    block = twin.mask_decoder.transformer.layers[0]
    assert type(block) is training.TwoWayAttentionBlock
    assert type(block.cross_attn_token_to_image) is training.Attention
    assert type(twin.mask_decoder) is training.MaskDecoder
    assert type(twin.mask_decoder.output_upscaling) is training.MaskUpscaling
    assert block.cross_attn_token_to_image.q_proj is tiny_sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image.q_proj
    assert dict(twin.named_parameters()).keys() == dict(tiny_sam.named_parameters()).keys()
    for (name, a), b in zip(twin.named_parameters(), tiny_sam.parameters()):
        assert a is b, name
    # The model's classes are untouched.
    assert type(tiny_sam.mask_decoder.transformer.layers[0]).__module__ == "segany.modeling.transformer"
