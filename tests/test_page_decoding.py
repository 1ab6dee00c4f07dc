"""The server side of in-page decoding: the ONNX decoder and compact embeddings (TestClient, fixture model)."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from tests.conftest import REFERENCE, needs_shared

pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
pytest.importorskip("httpx", reason="httpx (needed by FastAPI's TestClient) is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
from fastapi.testclient import TestClient  # noqa: E402

pytestmark = needs_shared


def png_bytes(h: int, w: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def start(client, h, w):
    project = client.post("/api/projects", json={"name": "p"}).json()
    up = client.post(f"/api/projects/{project['id']}/images", files=[("files", ("a.png", png_bytes(h, w, 3), "image/png"))])
    image = up.json()["images"][0]
    deadline = time.monotonic() + 120
    while client.get(f"/api/images/{image['id']}/embedding").json()["status"] != "ready":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return image


def parse_safetensors(data: bytes):
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__")
    (name, entry), = header.items()
    dtype = {"F16": np.float16, "F32": np.float32}[entry["dtype"]]
    begin, end = entry["data_offsets"]
    array = np.frombuffer(data[8 + n + begin : 8 + n + end], dtype=dtype).reshape(entry["shape"])
    return name, array, meta


@pytest.fixture(scope="module")
def server(fixture_sam, tmp_path_factory):
    from segany.server import ServerConfig, create_app

    data = tmp_path_factory.mktemp("data")
    config = ServerConfig(data_dir=data, checkpoint=REFERENCE / "sam_vit_small.pth")
    app = create_app(config, model=fixture_sam)
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        client.headers["Authorization"] = f"Bearer {config.token}"
        yield client, app, data


def test_decoder_export_served_cached_and_equal_to_server_decode(server, fixture_sam):
    from segany.predict import Prompt

    client, app, data = server
    h, w = 150, 230  # not square, not a multiple of anything
    image = start(client, h, w)
    info = client.get("/api/decoder").json()
    assert info["available"] and info["url"].endswith(".onnx") and info["image_size"] == 1024
    url = info["url"]
    assert url == f"/api/decoder/{info['key']}.onnx"
    from segany.server.onnx_decoder import GRAPH_KIND, PRECOMPUTE_FIRST_BLOCK

    assert info["key"].endswith(f"-{GRAPH_KIND}")  # segany.engine.page_graph's graphs, never an older cached kind
    first = client.get(url)
    assert first.status_code == 200 and first.headers["etag"]
    assert (data / "decoders" / f"{info['key']}.onnx").is_file()
    assert client.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
    # the once-per-image graph: the first block's image-side projections, the prompt graph's last inputs
    image_graph = info.get("image_graph")
    assert (image_graph is not None) == PRECOMPUTE_FIRST_BLOCK
    if image_graph is not None:
        assert image_graph["url"] == f"/api/decoder/{info['key']}-image.onnx" and image_graph["outputs"] == info["inputs"][5:]
        per_image = client.get(image_graph["url"])
        assert per_image.status_code == 200 and per_image.headers["etag"] != first.headers["etag"]
        assert (data / "decoders" / f"{info['key']}-image.onnx").is_file()
        assert client.get(image_graph["url"], headers={"If-None-Match": per_image.headers["etag"]}).status_code == 304
        projections = ort.InferenceSession(per_image.content, providers=["CPUExecutionProvider"])
    assert client.get("/api/decoder/0123456789abcdef.onnx").status_code == 404

    emb = client.get(f"/api/images/{image['id']}/embedding.safetensors?dtype=float32")
    assert emb.status_code == 200
    name, array, meta = parse_safetensors(emb.content)
    assert name == "image_embeddings" and array.shape == (1, 256, 64, 64) and array.dtype == np.float32
    assert meta["original_size"] == f"{h},{w}"
    assert client.get(
        f"/api/images/{image['id']}/embedding.safetensors?dtype=float32", headers={"If-None-Match": emb.headers["etag"]}
    ).status_code == 304
    half = client.get(f"/api/images/{image['id']}/embedding.safetensors")
    _, array16, _ = parse_safetensors(half.content)
    assert array16.dtype == np.float16 and len(half.content) < len(emb.content) * 0.51
    assert np.allclose(array16.astype(np.float32), array, rtol=1e-3, atol=1e-4)
    assert client.get(f"/api/images/{image['id']}/embedding.safetensors?dtype=int8").status_code == 422

    # The graph run on the served embedding gives the server's own decode (two points, then refinement).
    session = ort.InferenceSession(first.content, providers=["CPUExecutionProvider"])
    segmenter = app.state.segmenter
    embedding = app.state.embeddings.get(image["sha256"], None)
    ih, iw = (int(v) for v in meta["input_size"].split(","))
    points = np.array([[w * 0.3, h * 0.6], [w * 0.8, h * 0.2]])
    labels = np.array([1, 0])
    scale = np.array([iw / w, ih / h])
    mask_input = None
    for step in range(2):
        coords = np.concatenate([points * scale, [[0, 0]]])[None].astype(np.float32)
        feeds = {
            "image_embeddings": array,
            "point_coords": coords,
            "point_labels": np.array([[*labels, -1]], np.float32),
            "mask_input": (mask_input if mask_input is not None else np.zeros((256, 256), np.float32))[None, None],
            "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
        }
        if image_graph is not None:
            feeds.update(zip(image_graph["outputs"], projections.run(None, {"image_embeddings": array})))
        iou, low = session.run(None, feeds)  # the page's graph stops at the low-res logits (the page upscales)
        pred = segmenter.segment(
            embedding, Prompt(points=points, labels=labels, mask=mask_input), multimask_output=True, return_logits=True
        )
        np.testing.assert_allclose(iou[0, 1:], pred.scores, atol=1e-4)
        np.testing.assert_allclose(low[0, 1:], pred.low_res_logits, atol=1e-4)
        mask_input = low[0, 1 + int(np.argmax(iou[0, 1:]))]


def test_hq_sam_has_no_page_decoder(tmp_path):
    path = REFERENCE / "sam_hq_vit_small.pth"
    if not path.is_file():
        pytest.skip("the HQ-SAM fixture is absent")
    import segany
    from segany.server import ServerConfig, create_app

    config = ServerConfig(data_dir=tmp_path, checkpoint=path)
    app = create_app(config, model=segany.load_model(path))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        client.headers["Authorization"] = f"Bearer {config.token}"
        info = client.get("/api/decoder").json()
        assert info["available"] is False and "HQ-SAM" in info["reason"]
        missing = client.get("/api/decoder/anything.onnx")
        assert missing.status_code == 404 and "HQ-SAM" in missing.json()["detail"]
        page = client.get("/")
        assert page.headers["cross-origin-embedder-policy"] == "require-corp"


def test_decoder_is_exported_once_and_from_the_exact_model_in_fast_mode(server, tmp_path):
    import segany
    from segany.server.onnx_decoder import DecoderExport

    client, app, data = server
    exported = app.state.decoder_export.ensure()
    before = exported.stat().st_mtime_ns
    base = app.state.decoder_export.key.rsplit("-", 1)[0]  # the checkpoint hash, before the graph's kind
    again = DecoderExport(app.state.segmenter.model, exported.parent, REFERENCE / "sam_vit_small.pth", base)
    assert again.ensure() == exported and exported.stat().st_mtime_ns == before  # the cached file, not a new export
    fast = segany.load_model(REFERENCE / "sam_vit_small.pth", mode="fast")
    if getattr(fast, "fast_dtype", None) is None:
        pytest.skip("the fast mode has no separate dtype on this machine")
    path = DecoderExport(fast, tmp_path, REFERENCE / "sam_vit_small.pth", "fastcase").ensure()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["iou_predictions", "low_res_masks"]
    no_file = DecoderExport(fast, tmp_path / "nofile", None, None)
    with pytest.raises(RuntimeError, match="fast mode"):
        no_file.ensure()
    assert no_file.describe()["available"] is False
