"""The prompt encoder keeps its dense positional encoding between decodes, and recomputes it when
the Fourier matrix changes (new weights loaded, dtype or device moved)."""
import torch

from segany.engine.prompt_encoder import PromptEncoder  # the engine twin: keeps the dense PE


def test_dense_pe_cached_and_invalidated():
    torch.manual_seed(0)
    enc = PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128)).eval()
    with torch.no_grad():
        first = enc.get_dense_pe()
        assert enc.get_dense_pe() is first  # kept
        enc.pe_layer.positional_encoding_gaussian_matrix.copy_(torch.randn(2, 16))
        second = enc.get_dense_pe()
    assert second is not first
    assert not torch.allclose(first, second)
    assert torch.equal(second, enc.pe_layer((8, 8)).unsqueeze(0))


def test_plain_prompt_encoder_recomputes_the_dense_pe():
    """Training runs the plain definition: its dense PE is computed on every call;
    only the engine's twin keeps it."""
    from segany.modeling.prompt_encoder import PromptEncoder as Plain

    enc = Plain(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128)).train()
    first = enc.get_dense_pe()
    assert first is not enc.get_dense_pe()


def test_model_built_in_inference_mode_decodes():
    """Parameters made under torch.inference_mode have no version counter; the kept derived tensors
    (dense PE, upscaling matrices, stacked hypernetworks, the decoder's image side) must still work."""
    import numpy as np

    from segany.predict.predictor import SamPredictor

    from .smallsam import small_sam

    with torch.inference_mode():
        model = small_sam(0)
        predictor = SamPredictor(model)
        predictor.set_image_embedding(torch.randn(1, 64, 16, 16), (120, 213))
        first = predictor.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1]))
        again = predictor.predict(point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1]))
    assert first[0].shape == (3, 120, 213)
    np.testing.assert_array_equal(first[2], again[2])
