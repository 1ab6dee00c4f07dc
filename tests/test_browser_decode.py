"""In-page decoding in headless Chromium: ONNX Runtime Web against the server's decode, the fallback, the
page's cache across a reload, and the access-token convention of the page's API client."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from tests.conftest import DATASETS, REFERENCE, needs_shared
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, click_image, free_port, shot, until

pytestmark = [pytest.mark.browser, needs_shared]
uvicorn = pytest.importorskip("uvicorn", reason="uvicorn is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
pytest.importorskip("onnx", reason="onnx (the ONNX export) is not installed")

MOBILE = REFERENCE / "mobile_sam_vit_t.pth"
SSAM = REFERENCE.parent / "semantic_sam" / "semantic_sam_mini_seed0.pth"
TOKEN = "s3cret"  # the server's access token; the page takes it from the address


def serve(model, checkpoint, data, extra_models=()):
    """The server in a thread, with one project and one image (a smaller DAVIS frame) whose embedding is ready."""
    from PIL import Image

    from segany.server import ServerConfig, create_app

    config = ServerConfig(data_dir=data, checkpoint=checkpoint, token=TOKEN, extra_models=[str(m) for m in extra_models])
    app = create_app(config, model=model)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, 30)
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"})
    project = client.post("/api/projects", json={"name": "decode"}).json()
    path = DATASETS / "davis345" / "images" / "000.jpg"
    if not path.is_file():
        pytest.skip("davis345 image 000 is absent")
    buf = io.BytesIO()
    with Image.open(path) as im:  # an odd size: the crop and resize of the post-processing matter
        im.convert("RGB").resize((im.width // 2 + 1, im.height // 2 - 1)).save(buf, format="PNG")
    up = client.post(f"/api/projects/{project['id']}/images", files=[("files", ("davis.png", buf.getvalue(), "image/png"))])
    image = up.json()["images"][0]
    until(lambda: client.get(f"/api/images/{image['id']}/embedding").json()["status"] == "ready", 120, 0.2)
    live = {"base": base, "client": client, "project": project, "image": image, "app": app}

    def stop():
        client.close()
        server.should_exit = True
        thread.join(30)

    return live, stop


@pytest.fixture(scope="module")
def live(fixture_sam, tmp_path_factory):
    # The picker's further models load only when a test picks them.
    live, stop = serve(fixture_sam, REFERENCE / "sam_vit_small.pth", tmp_path_factory.mktemp("data"), [MOBILE, SSAM])
    yield live
    stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        try:
            b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:  # pragma: no cover - depends on the machine
            pytest.skip(f"chromium does not start under playwright: {exc}")
        yield b
        b.close()


def open_page(live, context, mode="page"):
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    image = live["image"]
    page.goto(f"{live['base']}/?project={live['project']['id']}&image={image['id']}#token={TOKEN}")
    page.wait_for_function(f"segany.shownImage === {image['id']}")
    page.wait_for_function("segany.decoderReady !== undefined")
    page.evaluate("segany.decoderReady")
    assert page.evaluate("segany.decoder.mode") == mode, page.evaluate("segany.decoder")
    return page, errors


def click_and_wait(page, x, y, button="left"):
    n = page.evaluate("segany.timings.length")
    click_image(page, x, y, button=button)
    page.wait_for_function(f"segany.timings.length === {n + 1}", timeout=60000)
    return page.evaluate("segany.lastTiming")


SAMPLED = """() => {
  const d = segany.lastDecode, plane = d.height * d.width, out = [];
  for (let c = 1; c <= 3; c++) for (let y = 0; y < d.height; y += 7) for (let x = 0; x < d.width; x += 7)
    out.push(d.logits[c * plane + y * d.width + x]);
  return { logits: out, iou: d.iou.slice(1), low: Array.from(d.lowRes.subarray(65536)), h: d.height, w: d.width };
}"""


def server_logits(live, points, labels, mask=None):
    from segany.predict import Prompt

    app, image = live["app"], live["image"]
    embedding = app.state.embeddings.get(image["sha256"], None)
    return app.state.segmenter.segment(
        embedding, Prompt(points=np.array(points), labels=np.array(labels), mask=mask), multimask_output=True, return_logits=True
    )


def test_in_page_decode_equals_the_servers(live, browser):
    image = live["image"]
    w, h = image["width"], image["height"]
    context = browser.new_context(viewport={"width": 1300, "height": 800})
    page, errors = open_page(live, context)
    # float32 embedding: the graph itself against the server's decode, 1e-4 on the logits
    page.evaluate("segany.embeddingDtype = 'float32'")
    timing = click_and_wait(page, w * 0.35, h * 0.55)
    assert timing["mode"] == "page"
    points = page.evaluate("segany.points.map(p => [p.x, p.y])")
    got = page.evaluate(SAMPLED)
    assert (got["h"], got["w"]) == (h, w)
    ref = server_logits(live, points, [1])
    np.testing.assert_allclose(np.array(got["logits"]).reshape(3, -1), ref.masks[:, ::7, ::7].reshape(3, -1), atol=1e-4)
    np.testing.assert_allclose(got["iou"], ref.scores, atol=1e-4)
    np.testing.assert_allclose(np.array(got["low"]).reshape(3, 256, 256), ref.low_res_logits, atol=1e-4)
    # the page's masks are the server's own decode (HTTP) wherever the logit is not at the threshold
    served = live["client"].post(f"/api/images/{image['id']}/decode", json={"points": points, "labels": [1]}).json()
    from pycocotools import mask as mask_utils

    for i, cand in enumerate(served["candidates"]):
        rle = {"size": cand["segmentation"]["size"], "counts": cand["segmentation"]["counts"].encode()}
        server_mask = mask_utils.decode(rle).astype(bool)
        page_mask = np.array(page.evaluate(f"Array.from(segany.candidates[{i}].mask)"), bool).reshape(h, w)
        sure = np.abs(ref.masks[i]) > 1e-3
        assert (page_mask[sure] == server_mask[sure]).all()

    # a negative click refines the chosen candidate with its low-res logits (mask input)
    selected = page.evaluate("segany.selected")
    previous = np.array(page.evaluate(f"Array.from(segany.candidates[{selected}].lowRes)"), np.float32).reshape(1, 256, 256)
    timing = click_and_wait(page, w * 0.8, h * 0.2, button="right")
    assert timing["mode"] == "page"
    points = page.evaluate("segany.points.map(p => [p.x, p.y])")
    got = page.evaluate(SAMPLED)
    ref = server_logits(live, points, [1, 0], mask=previous)
    np.testing.assert_allclose(np.array(got["logits"]).reshape(3, -1), ref.masks[:, ::7, ::7].reshape(3, -1), atol=1e-4)
    np.testing.assert_allclose(got["iou"], ref.scores, atol=1e-4)

    # a box, then the default float16 embedding: masks equal wherever the logit is clearly decided
    page.keyboard.press("Escape")
    page.evaluate("segany.embeddingDtype = 'float16'")
    start = page.evaluate(
        "([x, y]) => { const r = document.getElementById('canvas').getBoundingClientRect(); const v = segany.view;"
        " return [r.left + v.ox + x * v.scale, r.top + v.oy + y * v.scale, v.scale]; }", [w * 0.2, h * 0.3])
    n = page.evaluate("segany.timings.length")
    page.mouse.move(start[0], start[1])
    page.mouse.down()
    page.mouse.move(start[0] + w * 0.4 * start[2], start[1] + h * 0.4 * start[2], steps=4)
    page.mouse.up()
    page.wait_for_function(f"segany.timings.length === {n + 1}", timeout=60000)
    box = page.evaluate("[segany.box.x0, segany.box.y0, segany.box.x1, segany.box.y1]")
    from segany.predict import Prompt

    embedding = live["app"].state.embeddings.get(image["sha256"], None)
    ref = live["app"].state.segmenter.segment(embedding, Prompt(box=np.array(box)), return_logits=True)
    got = page.evaluate(SAMPLED)
    page_logits = np.array(got["logits"]).reshape(3, -1)
    ref_logits = ref.masks[:, ::7, ::7].reshape(3, -1)
    diff = np.abs(page_logits - ref_logits).max()
    assert diff < 1e-3, diff  # the float16 rounding of the embedding moves these logits by about 1.4e-4
    sure = np.abs(ref_logits) > 1e-3
    assert ((page_logits > 0) == (ref_logits > 0))[sure].all()
    shot(page, "10_in_page_decode")
    assert not errors, errors
    context.close()


def test_forced_server_decoding_and_back(live, browser):
    image = live["image"]
    context = browser.new_context(viewport={"width": 1300, "height": 800})
    page, errors = open_page(live, context)
    page.check("#force-server")
    page.wait_for_function("segany.decoder.mode === 'server'")
    assert "server" in page.inner_text("#decoder-mode")
    timing = click_and_wait(page, image["width"] * 0.5, image["height"] * 0.5)
    assert timing["mode"] == "server" and timing["server_ms"] >= 0
    assert page.evaluate("segany.candidates.length") == 3 and page.evaluate("segany.token") is not None
    # refinement on the server by token
    timing = click_and_wait(page, image["width"] * 0.2, image["height"] * 0.2, button="right")
    assert timing["mode"] == "server"
    # the setting survives a reload, and unchecking it brings the page's decoder back
    page.reload()
    page.wait_for_function(f"segany.shownImage === {image['id']}")
    page.evaluate("segany.decoderReady")
    assert page.evaluate("segany.decoder.mode") == "server" and page.is_checked("#force-server")
    page.uncheck("#force-server")
    page.wait_for_function("segany.decoder.mode === 'page'")
    assert "in-page" in page.inner_text("#decoder-mode")
    assert click_and_wait(page, image["width"] * 0.4, image["height"] * 0.6)["mode"] == "page"
    assert not errors, errors
    context.close()


def test_reload_decodes_from_the_pages_cache(live, browser):
    image = live["image"]
    context = browser.new_context(viewport={"width": 1300, "height": 800})
    page, errors = open_page(live, context)
    assert click_and_wait(page, image["width"] * 0.3, image["height"] * 0.3)["mode"] == "page"
    fetched = []
    page.on("request", lambda r: fetched.append(r.url) if ".onnx" in r.url or "embedding.safetensors" in r.url else None)
    page.reload()
    page.wait_for_function(f"segany.shownImage === {image['id']}")
    page.evaluate("segany.decoderReady")
    assert page.evaluate("segany.decoder.mode") == "page"
    assert click_and_wait(page, image["width"] * 0.6, image["height"] * 0.4)["mode"] == "page"
    assert fetched == [], fetched  # the decoder and the embedding came from the page's own cache
    assert not errors, errors
    context.close()


def test_token_from_the_address_goes_with_every_request(live, browser):
    image = live["image"]
    context = browser.new_context(viewport={"width": 1300, "height": 800})
    page = context.new_page()
    seen = []
    page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
    page.goto(f"{live['base']}/?project={live['project']['id']}&image={image['id']}#token={TOKEN}")
    page.wait_for_function(f"segany.shownImage === {image['id']}")
    assert "token" not in page.evaluate("location.href")
    assert page.evaluate("sessionStorage.getItem('segany.token')") == "s3cret"
    api_calls = [(u, a) for u, a in seen if "/api/" in u and "/file" not in u]
    assert api_calls and all(a == "Bearer s3cret" for _, a in api_calls), api_calls
    assert any("/file?token=s3cret" in u for u, _ in seen)  # the <img> carries it in its URL
    context.close()


@pytest.mark.heavy  # a second server and model; test_page_decoding checks the same refusal through the API
def test_hq_sam_falls_back_to_server_decoding(browser, tmp_path):
    path = REFERENCE / "sam_hq_vit_small.pth"
    if not path.is_file():
        pytest.skip("the HQ-SAM fixture is absent")
    import segany

    live, stop = serve(segany.load_model(path), path, tmp_path)
    try:
        context = browser.new_context(viewport={"width": 1300, "height": 800})
        page, errors = open_page(live, context, mode="server")
        assert "HQ-SAM" in page.inner_text("#decoder-mode")
        image = live["image"]
        timing = click_and_wait(page, image["width"] * 0.5, image["height"] * 0.5)
        assert timing["mode"] == "server" and page.evaluate("segany.candidates.length") >= 1
        assert page.evaluate("segany.work.length") == image["width"] * image["height"]
        assert not errors, errors
        context.close()
    finally:
        stop()


def test_find_box_disables_itself_without_a_text_model(live, browser):
    # This server has no CLIP model: /api/info says so and the page disables the box with the reason.
    image = live["image"]
    assert live["client"].get("/api/info").json()["text_model"] is False
    context = browser.new_context(viewport={"width": 1300, "height": 800})
    page = context.new_page()
    page.goto(f"{live['base']}/?project={live['project']['id']}&image={image['id']}#token={TOKEN}")
    page.wait_for_function(f"segany.shownImage === {image['id']}")
    page.wait_for_function("document.getElementById('find-run').disabled")
    assert not page.is_enabled("#find-text")
    assert "no text model" in page.inner_text("#find-note") and page.evaluate("segany.proposals.length") == 0
    # The endpoint itself answers why (409), which is what the page shows if it tries.
    r = live["client"].post(f"/api/images/{image['id']}/find", json={"text": "a dog"})
    assert r.status_code == 409 and "CLIP" in r.json()["detail"]
    context.close()


def test_model_picker_and_granularity_levels(live, browser):
    """The picker switches the decoding model (MobileSAM: its own ONNX decoder in the page, equal to the
    server's decode with that model); Semantic-SAM shows the level control and the level picks the candidate."""
    for path in (MOBILE, SSAM):
        if not path.is_file():
            pytest.skip(f"{path} is absent")
    context = browser.new_context(viewport={"width": 1300, "height": 800})
    page, errors = open_page(live, context)
    names = page.eval_on_selector_all("#model-picker option", "os => os.map(o => o.value)")
    assert names == [str(REFERENCE / "sam_vit_small.pth"), str(MOBILE), str(SSAM)]
    assert page.is_hidden("#level-control")

    page.select_option("#model-picker", str(MOBILE))
    page.wait_for_function(f"segany.model === {str(MOBILE)!r}")
    page.evaluate("segany.decoderReady")
    assert page.evaluate("segany.decoder.mode") == "page", page.evaluate("segany.decoder")
    page.evaluate("segany.embeddingDtype = 'float32'")
    timing = click_and_wait(page, 60, 50)
    assert timing["mode"] == "page"
    server = live["client"].post(f"/api/images/{live['image']['id']}/decode",
                                 json={"points": [[60, 50]], "labels": [1], "model": str(MOBILE)}).json()
    assert server["model"] == str(MOBILE)
    np.testing.assert_allclose(page.evaluate("segany.lastDecode.iou")[1:4], [c["score"] for c in server["candidates"]],
                               atol=5e-4)
    # the masks are the server's wherever the page's logit is clear of the threshold
    from pycocotools import mask as mask_utils

    d = page.evaluate("(() => { const d = segany.lastDecode; return { h: d.height, w: d.width,"
                      " logits: Array.from(d.logits.subarray(d.height * d.width)) }; })()")
    logits = np.array(d["logits"], dtype=np.float32).reshape(3, d["h"], d["w"])
    for c, cand in enumerate(server["candidates"]):
        rle = dict(cand["segmentation"])
        rle["counts"] = rle["counts"].encode()
        theirs = mask_utils.decode(rle).astype(bool)
        clear = np.abs(logits[c]) > 1e-3
        assert np.array_equal((logits[c] > 0)[clear], theirs[clear])
    page.evaluate("segany.embeddingDtype = 'float16'")

    page.select_option("#model-picker", str(SSAM))
    page.wait_for_function(f"segany.model === {str(SSAM)!r}")
    page.evaluate("segany.decoderReady")
    assert page.evaluate("segany.decoder.mode") == "server"
    page.wait_for_selector("#level-control", state="visible")
    timing = click_and_wait(page, 60, 50)
    assert timing["mode"] == "server"
    levels = page.evaluate("segany.candidates.map(c => c.level)")
    assert levels == [1, 2, 3, 4, 5, 6]
    assert page.evaluate("segany.selected") == page.evaluate("segany.level") - 1
    page.fill("#level", "5")  # a range input: fill sets its value and fires input
    assert page.evaluate("segany.selected") == 4 and page.text_content("#level-value") == "5"
    same = page.evaluate("(() => { const a = segany.work, b = segany.candidates[4].mask;"
                         " return a.length === b.length && a.every((v, i) => v === b[i]); })()")
    assert same
    page.evaluate("document.activeElement.blur()")  # keys go to the page, not the slider
    page.keyboard.press(",")
    assert page.evaluate("segany.level") == 4 and page.evaluate("segany.selected") == 3
    # the page's candidates are the server's for the page's click (its point, after the view's rounding)
    point = page.evaluate("[segany.points[0].x, segany.points[0].y]")
    server = live["client"].post(f"/api/images/{live['image']['id']}/decode",
                                 json={"points": [point], "labels": [1], "model": str(SSAM), "granularity": 5}).json()
    assert server["best"] == 4
    got = page.evaluate("segany.candidates[4].score")
    assert abs(got - server["candidates"][4]["score"]) < 1e-6
    # a second click replaces the first (one click per prompt), a negative click is refused in the page
    click_and_wait(page, 30, 30)
    assert page.evaluate("segany.points.length") == 1
    click_image(page, 40, 40, button="right")
    assert "one positive click" in page.text_content("#status")
    # the choice survives a reload
    page.reload()
    page.wait_for_function(f"segany.model === {str(SSAM)!r}")
    page.wait_for_function("segany.decoderReady !== undefined")
    page.evaluate("segany.decoderReady")
    assert page.is_visible("#level-control")
    shot(page, "model_picker_levels")
    assert not errors, errors
    context.close()
