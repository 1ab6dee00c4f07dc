"""CLIP in segany against open_clip (the test oracle), on random ViT-B-32-quickgelu weights."""
from __future__ import annotations

import pytest
import torch

from segany.modeling.clip import CLIP, CLIP_CONFIGS, config_from_state_dict, is_clip_state_dict

from .conftest import import_reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def reference_clip():
    open_clip = import_reference("open_clip")
    torch.manual_seed(1234)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    # open_clip's default init leaves some tensors at constants; spread every tensor so the parity test
    # exercises every weight.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def ours(reference_clip, tmp_path_factory):
    """segany.load_model on the reference's weights saved as a plain state dict in OpenAI's key layout."""
    import segany

    path = tmp_path_factory.mktemp("clip") / "ViT-B-32-random.pt"
    torch.save(reference_clip.state_dict(), path)
    model = segany.load_model(path)
    assert isinstance(model, CLIP)
    return model


@pytest.mark.parametrize("name", sorted(CLIP_CONFIGS))
def test_architecture_inferred_from_state_dict(name):
    with torch.device("meta"):
        sd = CLIP(CLIP_CONFIGS[name]).state_dict()
    assert is_clip_state_dict(sd)
    assert config_from_state_dict(sd) == CLIP_CONFIGS[name]


def test_state_dict_keys_are_openai_layout(reference_clip, ours):
    assert set(ours.state_dict()) == set(reference_clip.state_dict())


@pytest.mark.parametrize("seed,batch", [(7, 3)])
def test_image_embeddings_match_open_clip(reference_clip, ours, seed, batch):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, 224, 224, generator=g)
    with torch.no_grad():
        ref = reference_clip.encode_image(pixels)
        got = ours.encode_image(pixels)
        assert rel(got, ref) < 1e-5
        for i in range(batch):
            assert rel(got[i], ref[i]) < 1e-5
        assert rel(ours.encode_image(pixels, normalize=True), reference_clip.encode_image(pixels, normalize=True)) < 1e-5


def test_text_embeddings_match_open_clip(reference_clip, ours):
    from segany.text import tokenize

    texts = ["a dog", "", "a photo of a red car parked by the sea", "東京の猫 😀 &amp; friends " * 10]
    tokens = tokenize(texts)
    with torch.no_grad():
        ref = reference_clip.encode_text(tokens)
        got = ours.encode_text(tokens)
    for i in range(len(texts)):
        assert rel(got[i], ref[i]) < 1e-5
    # random ids with the end-of-text token at random positions
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 49406, (3, 77), generator=g)
    for row, pos in enumerate([5, 40, 76]):
        ids[row, pos] = 49407
        ids[row, pos + 1:] = 0
    with torch.no_grad():
        assert rel(ours.encode_text(ids), reference_clip.encode_text(ids)) < 1e-5
