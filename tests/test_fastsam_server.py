"""The annotation server with a FastSAM model for its everything-mode proposals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import DATASETS, SHARED, needs_shared

pytest.importorskip("httpx", reason="httpx (needed by FastAPI's TestClient) is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

FIXTURES = SHARED / "fixtures" / "fastsam"
pytestmark = [needs_shared, pytest.mark.skipif(not (FIXTURES / "fastsam_s_random.pt").is_file(),
                                               reason="../shared/fixtures/fastsam is absent")]


def test_proposals_from_fastsam(fixture_sam, tmp_path):
    from segany.server import ServerConfig, create_app

    config = ServerConfig(data_dir=tmp_path / "data", proposal_model=str(FIXTURES / "fastsam_s_random.pt"))
    image_file = DATASETS / "grabcut" / "images" / "124080.jpg"
    with TestClient(create_app(config, model=fixture_sam), base_url="http://127.0.0.1:8000") as client:
        client.headers["X-User"] = "tester"
        client.headers["Authorization"] = f"Bearer {config.token}"
        project = client.post("/api/projects", json={"name": "fastsam"}).json()
        up = client.post(f"/api/projects/{project['id']}/images",
                         files=[("files", (image_file.name, image_file.read_bytes(), "image/jpeg"))])
        assert up.status_code == 201, up.text
        image = up.json()["images"][0]
        r = client.post(f"/api/images/{image['id']}/proposals", json={"max_proposals": 500})
        assert r.status_code == 200, r.text
        props = r.json()["proposals"]
        manifest = json.loads((FIXTURES / "manifest.json").read_text())
        assert len(props) == manifest["cases"]["fastsam_s_random__grabcut_124080"]["n_results"]
        ref = np.load(FIXTURES / "fastsam_s_random__grabcut_124080__everything.npz")
        np.testing.assert_allclose(sorted(p["predicted_iou"] for p in props), sorted(ref["scores"]), atol=1e-4)
        for p in props:
            m = mask_utils.decode({"size": p["segmentation"]["size"], "counts": p["segmentation"]["counts"].encode()})
            assert m.shape == (321, 481) and int(m.sum()) == p["area"] > 0
            assert 0 <= p["stability_score"] <= 1
        r = client.post(f"/api/images/{image['id']}/proposals", json={"max_proposals": 3})
        assert len(r.json()["proposals"]) == 3
