"""Semantic-SAM: the released Swin-T / Swin-L key layouts load strictly; bad checkpoints and inputs are
refused with one clear message; the deformable attention against a direct per-point loop; CLI errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from segany.io.errors import CheckpointError
from segany.io.semantic_sam import semantic_sam_from_state_dict
from segany.modeling.semantic_sam import (
    DecoderConfig, PixelDecoderConfig, SemanticSam, SemanticSamConfig, SwinConfig, infer_config,
)
from segany.modeling.semantic_sam.deformable_attention import MSDeformAttn
from segany.modeling.semantic_sam.swin import relative_position_index

from .conftest import SHARED

FIXTURES = SHARED / "fixtures" / "semantic_sam"


def released_state_dict(name: str) -> dict:
    """Random tensors with exactly the keys, shapes and dtypes of a released checkpoint's 'model' entry."""
    path = FIXTURES / f"{name}_keys.json"
    if not path.is_file():
        pytest.skip("../shared/fixtures/semantic_sam is absent")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape, dtype in json.loads(path.read_text()):
        if key.endswith("relative_position_index"):
            sd[key] = relative_position_index(int(round(shape[0] ** 0.5)))  # (w*w, w*w)
        else:
            sd[key] = torch.randn(shape, generator=g, dtype=getattr(torch, dtype)) * 0.02
    _tie_aliases(sd)
    return {"model": sd, "iteration": 1}


def _tie_aliases(sd: dict) -> None:
    pre = "model.sem_seg_head.predictor."
    for key in [k for k in sd if k.startswith(pre + "decoder.norm.")]:
        sd[key] = sd[pre + "decoder_norm." + key.rsplit(".", 1)[1]]
    for key in list(sd):
        for head in (pre + "bbox_embed.", pre + "decoder.bbox_embed."):
            if key.startswith(head):
                rest = key[len(head):].split(".", 1)[1]  # layers.j.weight
                sd[key] = sd[pre + "_bbox_embed." + rest]


@pytest.mark.parametrize("name,size", [("swint", "t"), pytest.param("swinl", "l", marks=pytest.mark.heavy)])
def test_released_layout_loads_strictly(name, size):
    wrapped = released_state_dict(name)
    model = semantic_sam_from_state_dict(wrapped["model"], size=size)
    assert model.cfg.size_name == size
    sd = model.state_dict()
    assert set(sd) == {k[len("model."):] for k in wrapped["model"]}
    for key, value in wrapped["model"].items():
        assert torch.equal(sd[key[len("model."):]], value.float() if value.is_floating_point() else value), key
    # the other size's name is refused
    other = "l" if size == "t" else "t"
    with pytest.raises(CheckpointError, match="not Swin-"):
        semantic_sam_from_state_dict(wrapped["model"], size=other)


def test_released_layout_errors_name_the_key():
    sd = released_state_dict("swint")["model"]
    broken = dict(sd)
    key = "model.sem_seg_head.pixel_decoder.layer_1.weight"
    broken[key] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(CheckpointError, match="layer_1.weight"):
        semantic_sam_from_state_dict(broken)
    missing = dict(sd)
    del missing["model.sem_seg_head.predictor.iou_prediction_head.layers.2.bias"]
    with pytest.raises(CheckpointError, match="iou_prediction_head"):
        semantic_sam_from_state_dict(missing)
    extra = dict(sd, **{"model.sem_seg_head.predictor.something_new": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="something_new"):
        semantic_sam_from_state_dict(extra)
    split = dict(sd)
    split["model.sem_seg_head.predictor.decoder.norm.weight"] = torch.ones(256)
    with pytest.raises(CheckpointError, match="same tensor"):
        semantic_sam_from_state_dict(split)


def loop_deformable_attention(attn: MSDeformAttn, query, reference, source, shapes):
    """Multi-scale deformable attention written point by point with explicit bilinear interpolation."""
    b, q, _ = query.shape
    m, lv, p = attn.n_heads, attn.n_levels, attn.n_points
    value = attn.value_proj(source)
    d = value.shape[-1] // m
    offsets = attn.sampling_offsets(query).view(b, q, m, lv, p, 2)
    weights = attn.attention_weights(query).view(b, q, m, lv * p).softmax(-1).view(b, q, m, lv, p)
    starts = np.cumsum([0] + [h * w for h, w in shapes])
    out = torch.zeros(b, q, m * d, dtype=torch.float64)
    for bi in range(b):
        for qi in range(q):
            for mi in range(m):
                for li, (h, w) in enumerate(shapes):
                    vmap = value[bi, starts[li]:starts[li + 1], mi * d:(mi + 1) * d].reshape(h, w, d).double()
                    for pi in range(p):
                        if reference.shape[-1] == 2:
                            loc = reference[bi, qi, li] + offsets[bi, qi, mi, li, pi] / torch.tensor([w, h])
                        else:
                            r = reference[bi, qi, li]
                            loc = r[:2] + offsets[bi, qi, mi, li, pi] / p * r[2:] * 0.5
                        # pixel centres at (i + 0.5) / size; zero outside
                        x = float(loc[0]) * w - 0.5
                        y = float(loc[1]) * h - 0.5
                        x0, y0 = int(np.floor(x)), int(np.floor(y))
                        acc = torch.zeros(d, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    acc += wy * wx * vmap[yy, xx]
                        out[bi, qi, mi * d:(mi + 1) * d] += float(weights[bi, qi, mi, li, pi]) * acc
    return attn.output_proj(out.float())


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_deformable_attention_equals_a_direct_loop(ref_dim):
    torch.manual_seed(3)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
    for prm in attn.parameters():
        torch.nn.init.normal_(prm, std=0.5)
    shapes = [(5, 7), (3, 4), (2, 2)]
    source = torch.randn(2, sum(h * w for h, w in shapes), 16)
    query = torch.randn(2, 4, 16)
    reference = torch.rand(2, 4, 3, ref_dim)
    with torch.no_grad():
        ours = attn(query, reference, source, shapes)
        loop = loop_deformable_attention(attn, query, reference, source, shapes)
    torch.testing.assert_close(ours, loop, atol=1e-5, rtol=1e-5)


def tiny_config() -> SemanticSamConfig:
    return SemanticSamConfig(
        swin=SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=7),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, encoder_layers=1, dim_feedforward=32),
        decoder=DecoderConfig(hidden_dim=32, num_layers=2, dim_feedforward=32, dim_proj=16),
    )


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = SemanticSam(tiny_config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn(prm.shape, generator=g) * 0.1)
    path = tmp_path_factory.mktemp("ssam") / "semantic_sam_tiny.pth"
    torch.save({"model": {"model." + k: v for k, v in model.state_dict().items()}, "iteration": 0}, path)
    return path, model


def test_inferred_config_and_predictor_on_another_model(tiny_checkpoint):
    import segany

    path, reference_model = tiny_checkpoint
    model = segany.load_model(path)
    assert infer_config(model.state_dict()) == tiny_config()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    predictor = segany.SamPredictor(model)
    predictor.set_image(image)
    assert predictor.input_size == (640, 896)
    masks, scores, low = predictor.predict(point_coords=[[200, 100]], return_logits=True)
    assert masks.shape == (6, 300, 420) and scores.shape == (6,)
    # the model run directly in its own frame agrees with the predictor's low-res logits
    from segany.predict.semantic_sam_predictor import resize_short_edge

    resized = torch.from_numpy(resize_short_edge(image, 640).copy()).permute(2, 0, 1)
    with torch.no_grad():
        logits, ious = reference_model(resized, torch.tensor([[200 / 420, 100 / 300]], dtype=torch.float64))
    order = [3, 2, 0, 4, 1, 5]
    torch.testing.assert_close(torch.from_numpy(scores), ious[0, order])
    filtered = predictor.predict_filtered([[200, 100]], iou_floor=-10)
    assert 1 <= len(filtered.levels) <= 6 and filtered.masks.shape[1:] == (300, 420)


def run_cli(capsys, *args):
    """The CLI in this process: (exit code, stderr)."""
    from segany.cli.main import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_cli_bad_levels_and_clicks_are_one_line_exit_2(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    path, _ = tiny_checkpoint
    image = tmp_path / "im.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    for args, message in [
        (("segment", image, "-c", path, "--point", "10,10", "--granularity", "7", "-o", tmp_path / "o"), "from 1 to 6"),
        (("segment", image, "-c", path, "--point", "100,10", "-g", "2", "-o", tmp_path / "o"), "outside"),
        (("everything", image, "-c", path, "--level", "0", "-o", tmp_path / "e"), "from 1 to 6"),
    ]:
        code, err = run_cli(capsys, *args)
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err


def test_cli_segment_and_everything_at_a_level(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    path, _ = tiny_checkpoint
    image = tmp_path / "im.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(image)
    code, err = run_cli(capsys, "segment", image, "-c", path, "--point", "20,20", "--granularity", "3", "-o", tmp_path / "s")
    assert code == 0, err
    result = json.loads((tmp_path / "s" / "result.json").read_text())
    assert [m["level"] for m in result["masks"]] == [3]
    code, err = run_cli(capsys, "everything", image, "-c", path, "--level", "3", "--points-per-side", "4",
                        "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "-o", tmp_path / "e")
    assert code == 0, err
    doc = json.loads((tmp_path / "e" / "im.json").read_text())
    assert doc["annotations"] and all(a["segmentation"]["size"] == [48, 64] for a in doc["annotations"])


def test_engine_decode_equals_the_model(tiny_checkpoint):
    from segany.engine import semantic_sam as engine

    _, model = tiny_checkpoint
    image = torch.randint(0, 256, (3, 200, 330), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    points = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.99, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        features = model.image_features(image)
        plain = model.decode(features, points)
        fast = engine.decode(model, engine.image_values(model, features), points)
    # the engine's deformable sampling is a weighted gather: the same terms summed in another order
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_size_in_a_name():
    from segany.io.semantic_sam import expected_size

    assert expected_size("semantic-sam-t") == "t" and expected_size("semantic_sam_l") == "l"
    assert expected_size("/x/swinl_only_sam_many2many.pth") == "l" and expected_size("semantic-sam-t.pth") == "t"
    assert expected_size("semantic_sam_mini_seed0.pth") is None and expected_size("semantic_sam_tiny.pth") is None


def test_sam_style_generators_take_semantic_sam(tiny_checkpoint):
    import segany
    from segany.predict.semantic_sam_amg import SemanticSamMaskSource

    _, model = tiny_checkpoint
    gen = segany.SamAutomaticMaskGenerator(model, points_per_side=2, pred_iou_thresh=-100, stability_score_thresh=0)
    assert isinstance(gen.generator.source, SemanticSamMaskSource) and gen.generator.source.levels == [1, 2, 3, 4, 5, 6]
    records = gen.generate(np.zeros((30, 40, 3), np.uint8) + 100)
    assert all(r["segmentation"].shape == (30, 40) for r in records)
