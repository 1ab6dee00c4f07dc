"""OpenAI's released ViT-*.pt layout (a traced TorchScript archive, float16 layers, float32 embeddings and
norms, three scalar tensors beside the weights), read by segany without running the archive's code.

The real file cannot be downloaded here; tests/openai_clip_archive.py builds a stand-in the way OpenAI's
was made. torch.jit.load and open_clip's OpenAI loader (which runs torch.jit.load) are the oracles."""
from __future__ import annotations

import re
import zipfile

import pytest
import torch

import segany
from segany.modeling.clip import CLIP

from .conftest import import_reference
from .openai_clip_archive import build, save_archive


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "ViT-B-32.pt"
    save_archive(build(seed=7), path)
    return path


def test_stand_in_has_the_released_archive_layout(archive):
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert "ViT-B-32/data.pkl" in names and "ViT-B-32/constants.pkl" in names
        assert any(n.startswith("ViT-B-32/code/__torch__/clip/model") for n in names)
        classes = set(re.findall(rb"__torch__\.[\w.]+", z.read("ViT-B-32/data.pkl")))
    assert any(c.startswith(b"__torch__.clip.model") for c in classes)
    assert any(c.startswith(b"__torch__.torch.nn.modules.activation") for c in classes)  # nn.MultiheadAttention
    sd = torch.jit.load(str(archive)).state_dict()
    assert {k for k in sd if sd[k].dtype == torch.int64} == {"input_resolution", "context_length", "vocab_size"}
    assert sd["visual.conv1.weight"].dtype == torch.float16 and sd["visual.proj"].dtype == torch.float16
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert sd["token_embedding.weight"].dtype == torch.float32 and sd["ln_final.weight"].dtype == torch.float32
    assert not any("attn_mask" in k for k in sd)  # the causal mask is a traced constant, not a weight


def test_released_layout_loads_without_running_code(archive, monkeypatch):
    want = {k: v for k, v in torch.jit.load(str(archive)).state_dict().items()
            if k not in ("input_resolution", "context_length", "vocab_size")}

    def refuse(*args, **kwargs):
        raise AssertionError("the archive's code must not run")

    monkeypatch.setattr(torch.jit, "load", refuse)
    model = segany.load_model(archive)
    assert isinstance(model, CLIP)
    cfg = model.config
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.width, cfg.vision.layers) == (64, 16, 128, 2)
    assert (cfg.text.width, cfg.text.layers, cfg.embed_dim) == (64, 2, 32)
    got = model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value.float()), key


def test_released_layout_embeddings_match_open_clip_openai_loader(archive):
    open_clip = import_reference("open_clip")
    from open_clip.openai import load_openai_model

    reference = load_openai_model(str(archive), precision="fp32", device="cpu").eval()  # torch.jit.load, state_dict()
    ours = segany.load_model(archive)
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 64, 64)
    tokens = segany.tokenize(["a dog", "a photo of a red car", ""])
    with torch.no_grad():
        for a, b in [(ours.encode_image(pixels), reference.encode_image(pixels)),
                     (ours.encode_text(tokens), reference.encode_text(tokens))]:
            assert ((a - b).norm() / b.norm()).item() < 1e-5
    del open_clip


def test_released_layout_embeddings_match_the_traced_archive_itself(archive):
    """The archive's own float16 graph (run by torch.jit here, as clip.load(jit=True) would) against
    segany's float32 model on the same weights: agreement up to float16 rounding."""
    traced = torch.jit.load(str(archive))
    ours = segany.load_model(archive)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64)
    tokens = segany.tokenize(["a dog", "two cats on a sofa"])
    with torch.no_grad():
        cos_image = torch.cosine_similarity(ours.encode_image(pixels), traced.encode_image(pixels).float())
        cos_text = torch.cosine_similarity(ours.encode_text(tokens), traced.encode_text(tokens).float())
    assert cos_image.min() > 0.999 and cos_text.min() > 0.999
