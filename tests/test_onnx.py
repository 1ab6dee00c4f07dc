"""ONNX export of the encoder and the prompt decoder; the ONNX Runtime predictor matches the torch one."""
from __future__ import annotations

import numpy as np
import pytest

import segany

from .conftest import REFERENCE, case_image_path, load_rgb, manifest, needs_shared
from .test_reference_sam import run_case

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from segany.io.onnx_export import export_decoder, export_encoder  # noqa: E402
from segany.predict.onnx_predictor import OnnxPredictor  # noqa: E402

pytestmark = needs_shared
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = segany.load_model(REFERENCE / "sam_vit_small.pth")
    folder = tmp_path_factory.mktemp("onnx")
    decoder = export_decoder(model, folder / "decoder.onnx")
    encoder = export_encoder(model, folder / "encoder.onnx")
    return model, decoder, encoder


@pytest.fixture(scope="module")
def pair(exported):
    """(torch predictor, ONNX predictor), both with davis345_000 set through their own encoders."""
    model, decoder, encoder = exported
    image = load_rgb(case_image_path("davis345_000"))
    torch_predictor = segany.SamPredictor(model)
    torch_predictor.set_image(image)
    onnx_predictor = OnnxPredictor(decoder, encoder=encoder, threads=2)
    onnx_predictor.set_image(image)
    return torch_predictor, onnx_predictor


def test_onnx_encoder_matches_torch_and_reference(pair):
    torch_predictor, onnx_predictor = pair
    got = onnx_predictor.get_image_embedding()
    np.testing.assert_allclose(got, torch_predictor.get_image_embedding().numpy(), atol=TOL, rtol=0)
    expected = np.load(REFERENCE / "sam_vit_small__davis345_000__embedding.npy")
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def _single_cases():
    if not (REFERENCE / "manifest.json").is_file():
        return []
    return [
        c
        for c in manifest()["cases"]
        if c.get("model") == "sam_vit_small" and c["image"] == "davis345_000" and "boxes" not in c
    ]


@pytest.mark.parametrize("case", _single_cases(), ids=lambda c: c["name"])
def test_onnx_predictor_matches_torch_predictor(pair, case):
    torch_predictor, onnx_predictor = pair
    expected = run_case(torch_predictor, case)
    got = run_case(onnx_predictor, case)
    for name, a, b in zip(("masks", "scores", "low_res"), got, expected):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=name)


def test_onnx_decoder_on_a_stored_embedding_and_another_size(exported, pair):
    """Any original size (the post-processing is dynamic in the graph), fed a stored embedding."""
    model, decoder, _ = exported
    torch_predictor, _ = pair
    embedding = torch_predictor.get_image_embedding().numpy()
    onnx_predictor = OnnxPredictor(decoder)
    onnx_predictor.set_image_embedding(embedding, (300, 1100))
    torch_predictor = segany.SamPredictor(model)
    torch_predictor.set_image_embedding(embedding, (300, 1100))
    kwargs = dict(point_coords=np.array([[500.0, 120.0], [800.0, 200.0]]), point_labels=np.array([1, 0]),
                  box=np.array([100.0, 50.0, 900.0, 280.0]), return_logits=True)
    for got, expected in zip(onnx_predictor.predict(**kwargs), torch_predictor.predict(**kwargs)):
        np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    with pytest.raises(ValueError):
        onnx_predictor.predict()
    with pytest.raises(ValueError):
        onnx_predictor.set_image(np.zeros((4, 4, 3), np.uint8))  # no encoder graph


def test_export_onnx_cli(tmp_path):
    from segany.cli.main import main

    out = tmp_path / "sub" / "decoder.onnx"
    main(["export-onnx", "-c", str(REFERENCE / "sam_vit_small.pth"), "-o", str(out)])
    assert out.is_file() and OnnxPredictor(out).embedding_shape == (1, 256, 64, 64)
    with pytest.raises(SystemExit) as exit_info:
        main(["export-onnx", "-c", str(tmp_path / "missing.pth"), "-o", str(out)])
    assert exit_info.value.code == 2
