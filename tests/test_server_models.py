"""The server's model picker: several models offered (the first the default, the others loaded on first
use), each request naming its model, unknown names refused, and Semantic-SAM's granularity levels."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REFERENCE, SHARED, needs_shared
from tests.live_server import live_server, png_bytes, wait_ready

pytest.importorskip("uvicorn", reason="uvicorn is not installed")
pytest.importorskip("httpx", reason="httpx is not installed")
pytestmark = needs_shared

SSAM = SHARED / "fixtures" / "semantic_sam" / "semantic_sam_mini_seed0.pth"
MOBILE = REFERENCE / "mobile_sam_vit_t.pth"
HQ = REFERENCE / "sam_hq_vit_small.pth"


@pytest.fixture(scope="module")
def live(fixture_sam, tmp_path_factory):
    for path in (SSAM, MOBILE, HQ):
        if not path.is_file():
            pytest.skip(f"{path} is absent")
    with live_server(fixture_sam, tmp_path_factory.mktemp("data"), checkpoint=REFERENCE / "sam_vit_small.pth",
                     model_name="small", extra_models=[str(MOBILE), str(HQ), str(SSAM)]) as live:
        client = live["client"]
        project = client.post("/api/projects", json={"name": "models"}).json()
        up = client.post(f"/api/projects/{project['id']}/images",
                         files=[("files", ("a.png", png_bytes(61, 97, seed=3), "image/png"))]).json()
        live["image"] = up["images"][0]
        wait_ready(client, live["image"]["id"])
        yield live


def decode(live, **body):
    return live["client"].post(f"/api/images/{live['image']['id']}/decode", json=body)


def test_info_lists_the_models_default_first(live):
    models = live["client"].get("/api/info").json()["models"]
    assert [m["name"] for m in models] == ["small", str(MOBILE), str(HQ), str(SSAM)]
    assert models[0]["default"] and models[0]["loaded"] and models[0]["family"] == "sam"
    assert models[0]["decoder"] == "page" and models[0]["levels"] == 0
    assert not any(m["default"] for m in models[1:])


def test_unknown_model_is_a_422_that_names_the_offered_ones(live):
    client, image = live["client"], live["image"]["id"]
    answers = [
        decode(live, points=[[10, 10]], labels=[1], model="vit_h"),
        client.get(f"/api/images/{image}/embedding", params={"model": "vit_h"}),
        client.post(f"/api/images/{image}/embedding", params={"model": "vit_h"}),
        client.get("/api/decoder", params={"model": "vit_h"}),
        client.get(f"/api/images/{image}/embedding.safetensors", params={"model": "vit_h"}),
    ]
    for r in answers:
        assert r.status_code == 422, r.text
        assert "unknown model 'vit_h'" in r.json()["detail"] and "small" in r.json()["detail"]
    assert client.get("/api/decoder/nope.onnx").status_code == 404


def test_a_picked_sam_model_decodes_as_its_own_segmenter(live):
    import segany
    from segany.predict import Prompt, Segmenter

    client, image = live["client"], live["image"]
    r = decode(live, points=[[40, 30]], labels=[1], model=str(MOBILE))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == str(MOBILE)
    seg = Segmenter(segany.load_model(MOBILE))
    path = live["ctx"].image_path(image)
    pred = seg.segment(seg.embed(path), Prompt(points=np.array([[40.0, 30.0]]), labels=np.array([1])))
    from segany.server.masks import encode

    assert [c["segmentation"]["counts"] for c in out["candidates"]] == [encode(m)["counts"] for m in pred.masks]
    np.testing.assert_allclose([c["score"] for c in out["candidates"]], pred.scores, atol=1e-5)
    # the default model answers differently (another network), and says which it was
    default = decode(live, points=[[40, 30]], labels=[1]).json()
    assert default["model"] == "small"
    # refinement tokens belong to their model's cache
    again = decode(live, points=[[40, 30], [20, 20]], labels=[1, 1], model=str(MOBILE),
                   mask_input={"token": out["token"], "index": 0})
    assert again.status_code == 200, again.text
    # its embedding and ONNX decoder are its own
    status = client.get(f"/api/images/{image['id']}/embedding", params={"model": str(MOBILE)}).json()
    assert status["status"] == "ready"
    info = client.get("/api/decoder", params={"model": str(MOBILE)}).json()
    assert info["available"] and info["model"] == str(MOBILE)
    assert info["key"] != client.get("/api/decoder").json()["key"]
    models = {m["name"]: m for m in client.get("/api/info").json()["models"]}
    assert models[str(MOBILE)]["loaded"] and models[str(MOBILE)]["decoder"] == "page"


def test_hq_sam_is_offered_with_server_decoding(live):
    info = live["client"].get("/api/decoder", params={"model": str(HQ)}).json()
    assert info["available"] is False and "HQ-SAM" in info["reason"]
    r = decode(live, points=[[40, 30]], labels=[1], model=str(HQ))
    assert r.status_code == 200 and r.json()["candidates"] and r.json()["model"] == str(HQ)


def test_semantic_sam_decodes_six_levels_and_the_chosen_one_is_best(live):
    import segany
    from segany.predict.semantic_sam_predictor import SemanticSamPredictor
    from segany.server.masks import encode

    r = decode(live, points=[[50.5, 20.25]], labels=[1], model=str(SSAM), granularity=4)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["level"] for c in out["candidates"]] == [1, 2, 3, 4, 5, 6] and out["best"] == 3
    predictor = SemanticSamPredictor(segany.load_model(SSAM))
    predictor.set_image(str(live["ctx"].image_path(live["image"])))
    masks, scores, _ = predictor.predict(point_coords=[[50.5, 20.25]])
    assert [c["segmentation"]["counts"] for c in out["candidates"]] == [encode(m)["counts"] for m in masks]
    np.testing.assert_allclose([c["score"] for c in out["candidates"]], scores, atol=1e-5)
    without = decode(live, points=[[50.5, 20.25]], labels=[1], model=str(SSAM)).json()
    assert without["best"] == int(np.argmax(scores))
    models = {m["name"]: m for m in live["client"].get("/api/info").json()["models"]}
    assert models[str(SSAM)]["family"] == "semantic-sam" and models[str(SSAM)]["levels"] == 6
    assert models[str(SSAM)]["decoder"] == "server"
    assert live["client"].get("/api/decoder", params={"model": str(SSAM)}).json()["available"] is False


@pytest.mark.parametrize("body, words", [
    ({"granularity": 7}, "less than or equal to 6"),
    ({"granularity": 0}, "greater than or equal to 1"),
    ({"points": [[5, 5], [9, 9]], "labels": [1, 1]}, "exactly one click"),
    ({"labels": [0]}, "foreground"),
    ({"box": [1, 1, 20, 20]}, "no box"),
    ({"points": [[500, 5]]}, "outside"),
])
def test_semantic_sam_bad_prompts_are_422_with_a_reason(live, body, words):
    full = {"points": [[30, 20]], "labels": [1], "model": str(SSAM), **body}
    r = decode(live, **full)
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"]


def test_granularity_on_a_sam_model_is_refused(live):
    r = decode(live, points=[[30, 20]], labels=[1], granularity=2)
    assert r.status_code == 422 and "multi-granularity" in r.json()["detail"]


def test_a_semantic_sam_default_is_refused_with_a_reason(tmp_path):
    import segany
    from segany.server import ServerConfig, create_app

    with pytest.raises(ValueError, match="SAM-family"):
        create_app(ServerConfig(data_dir=tmp_path, checkpoint=SSAM), model=segany.load_model(SSAM))
