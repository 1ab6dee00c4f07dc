"""The annotator page's folded decoder graph (segany.engine.page_graph) equals the plain modules' graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE

from segany.engine.page_graph import PROJECTIONS, PageDecoderGraph, PageImageGraph, page_graph_unsupported
from segany.io.onnx_export import PromptDecoderLowResGraph, export_decoder, export_page_image_graph

# (point_coords, point_labels, has_mask_input) in the 1024 frame, as the page sends them
PROMPTS = {
    "one point": ([[300.0, 200.0], [0.0, 0.0]], [1, -1], 0.0),
    "several points": ([[300.0, 200.0], [510.5, 700.0], [12.0, 1010.0], [900.0, 64.0], [0.0, 0.0]], [1, 0, 1, 0, -1], 0.0),
    "box": ([[100.0, 220.0], [640.0, 575.0]], [2, 3], 0.0),
    "box and a point": ([[100.0, 220.0], [640.0, 575.0], [400.0, 400.0]], [2, 3, 0], 0.0),
    "point with mask input": ([[300.0, 200.0], [700.0, 650.0], [0.0, 0.0]], [1, 1, -1], 1.0),
}


def feeds(prompt: str, seed: int, channels: int = 256, grid: int = 64):
    coords, labels, has_mask = PROMPTS[prompt]
    g = torch.Generator().manual_seed(seed)
    mask = 6 * torch.randn(1, 1, 4 * grid, 4 * grid, generator=g)  # (ignored where has_mask_input is 0)
    return (
        torch.randn(1, channels, grid, grid, generator=g),
        torch.tensor([coords]),
        torch.tensor([labels], dtype=torch.float32),
        mask,
        torch.tensor([has_mask]),
    )


@pytest.fixture(scope="module")
def vit_b():
    from segany.io.models import sam_model_registry

    torch.manual_seed(7)
    model = sam_model_registry["vit_b"]().eval()
    # The released weights' scale is not a random init's: spread the decoder's so logits are far from 0.
    with torch.no_grad():
        for name, p in model.mask_decoder.named_parameters():
            if "norm" not in name:
                p.mul_(1.5)
    return model


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_folded_graph_equals_the_plain_modules(vit_b, prompt):
    plain, folded = PromptDecoderLowResGraph(vit_b), PageDecoderGraph(vit_b)
    args = feeds(prompt, seed=len(prompt))
    with torch.no_grad():
        (iou_a, low_a), (iou_b, low_b) = plain(*args), folded(*args)
    assert low_b.shape == low_a.shape == (1, 4, 256, 256) and iou_b.shape == iou_a.shape == (1, 4)
    assert low_a.abs().max() > 1.0  # logits far from 0: a comparison that means something
    torch.testing.assert_close(low_b, low_a, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou_b, iou_a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_graph_with_projections_made_once_per_image_equals_the_plain_modules(vit_b, prompt):
    """The first block's image-side projections from PageImageGraph, the rest per prompt: the same logits,
    with and without a mask input (its dense embedding enters as a rank-17 correction)."""
    plain, image_graph = PromptDecoderLowResGraph(vit_b), PageImageGraph(vit_b)
    prompt_graph = PageDecoderGraph(vit_b, precomputed=True)
    args = feeds(prompt, seed=3 * len(prompt))
    with torch.no_grad():
        projections = image_graph(args[0])
        (iou_a, low_a), (iou_b, low_b) = plain(*args), prompt_graph(*args, *projections)
    assert [tuple(p.shape) for p in projections] == [(8, 16, 4096), (8, 4096, 16), (8, 4096, 16)]
    assert low_a.abs().max() > 1.0
    torch.testing.assert_close(low_b, low_a, atol=1e-4, rtol=0)
    torch.testing.assert_close(iou_b, iou_a, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="t2i_keys"):
        prompt_graph(*args)


def test_folded_graph_reads_the_models_weights_at_run_time(vit_b):
    """No copy of the weights is taken when the graph is made: it is the model's decoder."""
    folded = PageDecoderGraph(vit_b)
    args = feeds("one point", 3)
    with torch.no_grad():
        before = folded(*args)[1]
        token = vit_b.mask_decoder.mask_tokens.weight
        saved = token.clone()
        token.add_(0.5)
        try:
            after, expected = folded(*args)[1], PromptDecoderLowResGraph(vit_b)(*args)[1]
        finally:
            token.copy_(saved)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=0)


def test_hq_sam_and_other_decoders_have_no_folded_graph(vit_b):
    from segany.modeling import transformer as plain_transformer

    class OtherAttention(plain_transformer.Attention):
        pass

    hq = REFERENCE / "sam_hq_vit_small.pth"
    if hq.is_file():
        import segany

        assert "HQ-SAM" in page_graph_unsupported(segany.load_model(hq))
        with pytest.raises(ValueError, match="HQ-SAM"):
            PageDecoderGraph(segany.load_model(hq))
    layer = vit_b.mask_decoder.transformer.layers[1]
    original = layer.cross_attn_image_to_token
    layer.cross_attn_image_to_token = OtherAttention(256, 8, 2)
    try:
        assert "OtherAttention" in page_graph_unsupported(vit_b)
    finally:
        layer.cross_attn_image_to_token = original
    assert page_graph_unsupported(vit_b) is None


def _onnxruntime_and_fixture_model(fixture: str):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    path = REFERENCE / fixture
    if not path.is_file():
        pytest.skip(f"../shared/fixtures/reference/{fixture} is absent")
    import segany

    return ort, segany.load_model(path)


# MobileSAM's decoder is SAM's (its own weights): heavy, to keep the default suite short.
@pytest.mark.parametrize("fixture", ["sam_vit_small.pth", pytest.param("mobile_sam_vit_t.pth", marks=pytest.mark.heavy)])
def test_exported_folded_graph_equals_the_plain_one_in_onnxruntime(fixture, tmp_path):
    ort, model = _onnxruntime_and_fixture_model(fixture)
    graph = export_decoder(model, tmp_path / "folded.onnx", folded=True)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["iou_predictions", "low_res_masks"]
    names = [i.name for i in session.get_inputs()]
    pe = model.prompt_encoder
    for prompt in PROMPTS:
        args = feeds(prompt, 5, pe.embed_dim, pe.image_embedding_size[0])
        with torch.no_grad():
            iou, low = PromptDecoderLowResGraph(model)(*args)
        got_iou, got_low = session.run(None, {n: a.numpy() for n, a in zip(names, args)})
        np.testing.assert_allclose(got_low, low.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_iou, iou.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", ["sam_vit_small.pth", pytest.param("mobile_sam_vit_t.pth", marks=pytest.mark.heavy)])
def test_exported_graphs_with_projections_made_once_per_image_in_onnxruntime(fixture, tmp_path):
    ort, model = _onnxruntime_and_fixture_model(fixture)
    image_graph = ort.InferenceSession(str(export_page_image_graph(model, tmp_path / "image.onnx")), providers=["CPUExecutionProvider"])
    prompt_graph = ort.InferenceSession(str(export_decoder(model, tmp_path / "prompt.onnx", precomputed=True)),
                                        providers=["CPUExecutionProvider"])
    assert [o.name for o in image_graph.get_outputs()] == list(PROJECTIONS)
    names = [i.name for i in prompt_graph.get_inputs()]
    assert names[5:] == list(PROJECTIONS)
    pe = model.prompt_encoder
    for prompt in PROMPTS:
        args = feeds(prompt, 11, pe.embed_dim, pe.image_embedding_size[0])
        with torch.no_grad():
            iou, low = PromptDecoderLowResGraph(model)(*args)
        projections = image_graph.run(None, {"image_embeddings": args[0].numpy()})
        got_iou, got_low = prompt_graph.run(None, dict(zip(names, [a.numpy() for a in args] + projections)))
        np.testing.assert_allclose(got_low, low.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got_iou, iou.numpy(), atol=1e-4, rtol=0)
