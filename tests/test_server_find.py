"""POST /api/images/{id}/find: proposals ranked by a text, in the proposals endpoint's record format."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import REFERENCE, needs_shared
from tests.test_server import png_bytes, wait_ready

pytest.importorskip("fastapi", reason="the server extra (fastapi) is not installed")
from fastapi.testclient import TestClient  # noqa: E402

pytestmark = needs_shared
CHECKPOINT = REFERENCE / "sam_vit_small.pth"
SETTINGS = {"points_per_side": 6, "pred_iou_thresh": 0, "stability_score_thresh": 0, "box_nms_thresh": 1.0,
            "min_mask_region_area": 0}


@pytest.fixture(scope="module")
def tiny_clip():
    from segany.modeling.clip import CLIP, ClipConfig, ClipTextConfig, ClipVisionConfig

    torch.manual_seed(4)
    return CLIP(ClipConfig(32, ClipVisionConfig(64, 16, 64, 1, 1), ClipTextConfig(77, 49408, 64, 1, 1))).eval()


def start(tmp_path, model, clip_model):
    from segany.server import ServerConfig, create_app

    config = ServerConfig(data_dir=tmp_path, checkpoint=CHECKPOINT)
    app = create_app(config, model=model, clip_model=clip_model)
    client = TestClient(app, base_url="http://127.0.0.1:8000")  # its peer is not loopback: send the token
    client.__enter__()
    client.headers["X-User"] = "tester"
    client.headers["Authorization"] = f"Bearer {config.token}"
    project = client.post("/api/projects", json={"name": "p"}).json()
    up = client.post(f"/api/projects/{project['id']}/images", files=[("files", ("a.png", png_bytes(48, 64, 1), "image/png"))])
    image = up.json()["images"][0]
    wait_ready(client, image["id"])
    return app, client, image


def test_find_ranks_proposals_by_text(fixture_sam, tiny_clip, tmp_path):
    from segany.io import rle as rle_io
    from segany.predict.text_select import score_masks

    app, c, image = start(tmp_path, fixture_sam, tiny_clip)
    try:
        app.state.find_proposal_settings = dict(SETTINGS)
        r = c.post(f"/api/images/{image['id']}/find", json={"text": "a bright square", "top_k": 3, "negative": ["dark"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"matches", "seconds"}
        props = c.post(f"/api/images/{image['id']}/proposals", json={**SETTINGS, "max_proposals": 2000}).json()["proposals"]
        assert len(props) >= 3
        by_index = {p["index"]: p for p in props}
        masks = np.stack([rle_io.decode(p["segmentation"]) for p in props])
        rgb = np.array(__import__("PIL.Image", fromlist=["Image"]).open(__import__("io").BytesIO(png_bytes(48, 64, 1))).convert("RGB"))
        scores, _ = score_masks(rgb, masks, "a bright square", tiny_clip, negative=["dark"])
        want = np.argsort(-scores[0], kind="stable")[:3]
        assert [m["index"] for m in body["matches"]] == [props[i]["index"] for i in want]
        for match, i in zip(body["matches"], want):
            score = match.pop("score")
            assert abs(score - scores[0, i]) < 1e-5
            assert match == by_index[match["index"]]  # exactly the proposals endpoint's record
    finally:
        c.__exit__(None, None, None)


def test_find_bad_input_and_no_clip(fixture_sam, tiny_clip, tmp_path):
    app, c, image = start(tmp_path / "a", fixture_sam, tiny_clip)
    try:
        url = f"/api/images/{image['id']}/find"
        for body in [{"text": ""}, {"text": "   "}, {"text": "x" * 301}, {"text": "a", "top_k": 0},
                     {"text": "a", "top_k": 51}, {"text": "a", "negative": [""]}, {}]:
            r = c.post(url, json=body)
            assert r.status_code == 422 and r.json()["detail"], (body, r.text)
        assert c.post("/api/images/9999/find", json={"text": "a dog"}).status_code == 404
    finally:
        c.__exit__(None, None, None)
    app, c, image = start(tmp_path / "b", fixture_sam, None)
    try:
        r = c.post(f"/api/images/{image['id']}/find", json={"text": "a dog"})
        assert r.status_code == 409 and "--clip" in r.json()["detail"]
    finally:
        c.__exit__(None, None, None)


FASTSAM = REFERENCE.parent / "fastsam" / "fastsam_s_random.pt"


@pytest.mark.skipif(not FASTSAM.is_file(), reason="../shared/fixtures/fastsam is absent")
def test_find_ranks_fastsam_proposals_when_the_server_proposes_with_fastsam(fixture_sam, tiny_clip, tmp_path):
    """segany serve --proposal-model fastsam-...: find scores FastSAM's instances, the records exactly as
    the proposals endpoint returns them."""
    from segany.io import rle as rle_io
    from segany.predict.text_select import score_masks
    from segany.server import ServerConfig, create_app

    from tests.conftest import DATASETS

    config = ServerConfig(data_dir=tmp_path, checkpoint=CHECKPOINT, proposal_model=str(FASTSAM))
    image_file = DATASETS / "grabcut" / "images" / "124080.jpg"
    with TestClient(create_app(config, model=fixture_sam, clip_model=tiny_clip), base_url="http://127.0.0.1:8000") as c:
        c.headers["X-User"] = "tester"
        c.headers["Authorization"] = f"Bearer {config.token}"
        project = c.post("/api/projects", json={"name": "p"}).json()
        up = c.post(f"/api/projects/{project['id']}/images",
                    files=[("files", (image_file.name, image_file.read_bytes(), "image/jpeg"))])
        image = up.json()["images"][0]
        r = c.post(f"/api/images/{image['id']}/find", json={"text": "a flower", "top_k": 4})
        assert r.status_code == 200, r.text
        matches = r.json()["matches"]
        props = c.post(f"/api/images/{image['id']}/proposals", json={}).json()["proposals"]
        assert len(props) > 4 and len(matches) == 4
        by_index = {p["index"]: p for p in props}
        order = sorted(by_index)
        masks = np.stack([rle_io.decode(by_index[i]["segmentation"]) for i in order])
        scores, _ = score_masks(image_file, masks, "a flower", tiny_clip)
        want = [order[i] for i in np.argsort(-scores[0], kind="stable")[:4]]
        assert [m["index"] for m in matches] == want
        for match in matches:
            score = match.pop("score")
            assert abs(score - scores[0, order.index(match["index"])]) < 1e-5
            assert match == by_index[match["index"]]  # FastSAM's record, exactly as the proposals endpoint gives it
